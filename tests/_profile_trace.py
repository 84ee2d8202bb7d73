"""Reads back the step annotations of a `jax.profiler` trace (see mmrec_jax.profiling)."""

import gzip
import json

from mmrec_jax import profiling


def traced_steps(log_dir, name="train") -> list[int]:
    """The step numbers of the `name` step annotations in the newest trace under `log_dir`."""
    folder = profiling.newest_trace(log_dir)
    (trace,) = folder.glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return sorted(
        int(e["args"]["step_num"]) for e in events if e.get("ph") == "X" and e["name"] == name
    )
