"""Ray Jobs entrypoint: segment one plate described by a YAML job spec.

    ray job submit --working-dir . -- python jobs/segment_plate.py jobs/example_spec.yaml
or  livecell-ray submit jobs/example_spec.yaml --address http://127.0.0.1:8265

Inside a job Ray sets RAY_ADDRESS, so the pipeline joins the cluster the job runs on. The spec keys
are those of ``livecell_ray.config.segment_config_from_spec`` (source, output, model, replicas,
gpus_per_replica, batch_size, storage_options, ...), and ``platemap`` (a CSV/Parquet path or URL the job
reads, as `segment --platemap`: checked against the plate first, its cell_line column taken by
`route: auto`, copied beside the results). Prints one JSON summary line at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from livecell_ray import offline  # noqa: E402

offline.configure()


def main(argv: list[str]) -> int:
    import yaml

    from livecell_ray import pipeline
    from livecell_ray.config import SpecError, segment_config_from_spec
    from livecell_ray.model.models import WeightsError
    from livecell_ray.plate import platemap
    from livecell_ray.plate.imaging import ImageError
    from livecell_ray.plate.manifest import ManifestError

    if len(argv) == 2 and argv[0] == "--spec-b64":  # how `livecell-ray submit` ships the spec: no shell quoting
        import base64

        spec_path, text = "submitted spec", base64.urlsafe_b64decode(argv[1].encode()).decode()
    elif len(argv) == 1:
        spec_path, text = argv[0], None
    else:
        print("usage: python jobs/segment_plate.py SPEC.yaml | --spec-b64 B64", file=sys.stderr)
        return 2
    try:
        import fsspec

        if text is None:
            with fsspec.open(spec_path, "r") as f:
                text = f.read()
        spec = yaml.safe_load(text)
        cfg = segment_config_from_spec(spec, spec_path)
        map_path = spec.get("platemap")
        pm = None
        if map_path:
            pm, cfg = platemap.for_run(map_path, cfg)
        planned = pipeline.plan(cfg)
        summary = pipeline.run(cfg, lambda res, done, total: print(
            f"[{done}/{total}] {res['status']} {res['path']}" + (f": {res['error']}" if res["error"] else ""),
            flush=True), planned)
        if pm is not None:
            platemap.save(planned[1], pm, map_path)
    except (SpecError, ManifestError, WeightsError, ImageError, pipeline.RunError, yaml.YAMLError,
            FileNotFoundError, platemap.PlateMapError) as exc:
        print(f"error: {pipeline.format_error(exc)}", file=sys.stderr)
        return 2
    print(json.dumps({"out": summary.out, "fields_total": summary.fields_total, "fields_done": summary.fields_done,
                      "fields_skipped": summary.fields_skipped, "fields_failed": summary.fields_failed,
                      "cells": summary.cells, "seconds": round(summary.seconds, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
