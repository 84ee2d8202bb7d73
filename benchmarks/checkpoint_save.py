"""Checkpoint saves: how long saving the train state holds training up, and in all.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 timeout 900 .venv/bin/python \\
        benchmarks/checkpoint_save.py --config configs/tiny.py [--config.KEY=VALUE ...] \\
        [--saves 5] [--rounds 2]

Builds the config's train state on every device (`mmrec_jax.train_step.build_train_state`:
parameters and optimizer state replicated unless `train.fsdp`) and saves it `--saves`
times through `mmrec_jax.checkpoint.Checkpointer`, asynchronously as training does,
under two settings in turn, `--rounds` times: the library's
`checkpoint.MIN_REPLICA_SLICE_BYTES`, and Orbax's default, which splits the save of
every replicated array over its replicas (each device slices out its part). For each,
it reports the first save (which compiles those slices), the median of the others (the
part training waits for, and until written) and the slice programs compiled. Prints one
JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import common
import jax

from mmrec_jax import checkpoint, cli, runtime, sharding, train_step
from mmrec_jax.models import recommender

# The settings compared: the library's threshold, and Orbax's default (no threshold).
SETTINGS = {"library": checkpoint.MIN_REPLICA_SLICE_BYTES, "orbax_default": None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_config_argument(parser, "configs/default.py")
    parser.add_argument(
        "--saves", type=common.at_least(2), default=5, help="saves per setting and round"
    )
    parser.add_argument("--rounds", type=common.at_least(1), default=2, help="rounds of both")
    return parser


def _saves(state: dict, folder: Path, saves: int) -> tuple[list[float], list[float]]:
    """(blocking seconds, seconds until written) of each of `saves` saves of `state`."""
    checkpointer = checkpoint.Checkpointer(folder, keep=1)
    blocking, written = [], []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpointer.save(step, state, {}, {})
        blocking.append(time.perf_counter() - start)
        checkpointer.wait()
        written.append(time.perf_counter() - start)
    checkpointer.close()
    return blocking, written


def main(argv=None) -> None:
    args, config = cli.parse_config_args(_parser(), argv)
    config.model.dtype = runtime.compute_dtype(config.model.dtype)  # "auto" -> this platform's
    common.fill_vocab(config)
    mesh = sharding.make_mesh()
    rows = int(config.train.batch_size)
    batch = sharding.global_batch(mesh, common.random_batch(config, rows, rows))
    model = recommender.build_model(config.model)
    state = train_step.build_train_state(config, model, mesh, batch, 1).state
    leaves = jax.tree.leaves(state)
    counter = common.CompileCounter()
    results: dict[str, dict] = {name: {"rounds": []} for name in SETTINGS}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for round_index in range(args.rounds):
                for name, min_slice_bytes in SETTINGS.items():
                    checkpoint.MIN_REPLICA_SLICE_BYTES = min_slice_bytes
                    compiled = counter.count("slice")
                    where = Path(folder) / f"{name}{round_index}"
                    blocking, written = _saves(state, where, args.saves)
                    results[name]["rounds"].append(
                        {
                            "first_save_blocking_s": round(blocking[0], 3),
                            "first_save_written_s": round(written[0], 3),
                            "save_blocking_ms_median": round(
                                statistics.median(blocking[1:]) * 1e3, 1
                            ),
                            "save_written_ms_median": round(
                                statistics.median(written[1:]) * 1e3, 1
                            ),
                            "slice_compilations": counter.count("slice") - compiled,
                        }
                    )
    finally:
        checkpoint.MIN_REPLICA_SLICE_BYTES = SETTINGS["library"]
    result = {
        "benchmark": "checkpoint_save",
        "config": args.config,
        "saves": args.saves,
        "min_replica_slice_bytes": SETTINGS["library"],
        "arrays": len(leaves),
        "state_mib": round(sum(x.nbytes for x in leaves) / 2**20, 2),
        "fsdp": bool(config.train.fsdp),
        **results,
        **common.machine(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    common.report_errors(main)
