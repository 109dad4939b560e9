"""Keep ultralytics (and Ray) from touching the network.

Ultralytics probes DNS on import, downloads fonts for plots and writes settings to ~/.config unless
told otherwise. Everything here must run on machines with no internet, so the environment is set
before ultralytics is ever imported, in the driver and in every Ray worker (through runtime_env).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

OFFLINE_ENV: dict[str, str] = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_VERBOSE": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def config_dir() -> Path:
    """Directory ultralytics uses for settings (and the font it would otherwise download)."""
    return Path(os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".cache" / "livecell-ray" / "yolo")


def configure() -> dict[str, str]:
    """Set the offline environment and place a bundled font where ultralytics looks for Arial.ttf."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    cfg = config_dir()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg))
    font_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    try:
        font_dir.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            target = font_dir / name
            if not target.exists():
                src = _dejavu_font()
                if src is not None:
                    shutil.copyfile(src, target)
    except OSError:
        pass  # a read-only home only costs plots, which we never make through ultralytics
    return {k: os.environ[k] for k in [*OFFLINE_ENV, "YOLO_CONFIG_DIR"]}


def _dejavu_font() -> Path | None:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return path if path.exists() else None
    except Exception:  # matplotlib missing: ultralytics then skips fonts because plots=False
        return None


def worker_env() -> dict[str, str]:
    """Environment variables for Ray runtime_env so workers are offline too."""
    return configure()


def quiet_ray_errors() -> None:
    """Ray's driver prints every error its processes publish (a dead raylet's last 20 log lines among them)
    to stdout from a thread of its own; the pipeline says what went wrong in one line (a field's failures/
    row, a RayDown), so those messages go to Ray's logger instead, which logs errors only."""
    import logging

    import ray._private.worker as ray_worker

    ray_log = logging.getLogger("ray")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            ray_log.debug("%s: %s", data.get("pid", "ray"), line)

    ray_worker.print_to_stdstream = to_log
