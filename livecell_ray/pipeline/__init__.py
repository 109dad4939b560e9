"""The run: a plate's manifest cut into shards, each a Ray task beside the model replicas.

    manifest rows --shards of batch_size fields--> shard.process_shard (a CPU task each):
        read + decode + normalise --> a replica (model.replica.SegmentActor: GPU or CPU, one batch)
        --> finish: measure + write to Zarr + Parquet, committed; a summary row a field back to the driver

``preflight`` checks what can be checked before Ray starts and records provenance; ``cluster`` starts Ray and
the replicas; ``shard`` is the task; ``finish`` measures, writes and records failures; ``driver`` is the
loop (lease, resume, the bounded shards in flight, the stall watchdog, run.json); ``stream`` segments files
too large to hold a tile row at a time; ``jobs`` submits a plate as a Ray Job; ``credentials`` keeps
secrets out of specs and paths.

A shard's fields are read, segmented and measured by one task: the raw planes never leave the process that
read them, and only the normalised planes and label images cross Ray's object store. Every stage catches
its own errors and passes the field on marked failed, so one bad file ends in failures/, never stops the
plate. Fault tolerance is Ray's own (actor restarts, task retries), safe because a field counts as done
only when its fields/ row is committed; a replica that hangs is caught by the driver's watchdog.

May import: plate, model, measure, store, config. Never answers or training.
"""

from livecell_ray import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "run": "driver", "cut_shards": "driver", "RunError": "preflight", "RunSummary": "preflight", "plan": "preflight",
    "provenance": "preflight", "same_provenance": "preflight", "init_ray": "cluster", "start_replicas": "cluster",
    "in_flight": "cluster", "format_error": "cluster", "RayDown": "cluster", "stop_local_ray": "cluster",
    "ray_down": "cluster", "SegmentActor": "cluster", "process_shard": "shard",
    "read_field": "shard", "stream_field": "shard", "finish_field": "finish", "finish_fields": "finish",
    "write_failure": "finish", "write_plates": "finish",
})
