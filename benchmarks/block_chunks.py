"""What encoding item blocks in chunks costs and saves: the train step both ways, one process.

    python benchmarks/block_chunks.py --config configs/default.py [--items 1200] \
        [--fill 0.5] [--steps 10] [--config.KEY=VALUE ...]

On CPU the content towers (a trained BERT, image, audio) encode an item block of
`schema.BLOCK_CHUNKS * schema.MIN_CHUNK_ITEMS` slots or more in chunks and skip the
chunks that hold no item (`mmrec_jax.models.layers.encode_in_chunks`); on GPU and TPU
they encode it in one go (`layers.item_block_chunks`), so both programs are the same
there. This compiles
the config's train step on one random batch twice, as the library runs it and with
every block encoded in one go, and calls the two alternately: on a shared 2-core
machine separate runs of one program differ by 10-15%, more than the difference
measured. `--fill` leaves the block's last slots empty, as a batch that does not fill
its block leaves them (in the input pipeline's slot order, so that they make whole
chunks; the rows point at filled slots only). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import common
import jax
import numpy as np

from mmrec_jax import cli, runtime, schema, sharding, train_step
from mmrec_jax.config import split_overrides
from mmrec_jax.models import layers, recommender


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_config_argument(parser, "configs/default.py")
    common.add_step_arguments(parser)
    parser.add_argument(
        "--items",
        type=common.at_least(1),
        default=None,
        help="slots in the item block (default: one per row)",
    )
    parser.add_argument(
        "--fill",
        type=float,
        default=1.0,
        help="share of the block's slots that hold an item, in (0, 1] (default 1: all)",
    )
    return parser


def partly_filled(batch: dict, fill: float, seed: int = 0) -> dict:
    """`batch` with only the first `fill` share of its item block's slots holding items.

    Slots are taken in `schema.slot_order` (the input pipeline's) when the block is a
    multiple of the chunks, so the empty ones make whole chunks at the end; the rows'
    candidate and history slots point at filled slots.
    """
    items = batch["items"]
    slots = items["item_index"].shape[0]
    filled = max(1, round(fill * slots))
    order = schema.slot_order(slots) if slots % schema.BLOCK_CHUNKS == 0 else np.arange(slots)
    empty = order[filled:]
    items = {name: array.copy() for name, array in items.items()}
    for name, array in items.items():  # as the pipeline pads: no flags, index -1, zeros
        array[empty] = -1 if name == "item_index" else 0
    out = dict(batch, items=items)
    rng = np.random.default_rng(seed)
    rows = batch["item_slot"].shape[0]
    out["item_slot"] = order[np.arange(rows) % filled].astype(np.int32)
    if "history_slot" in batch:
        picks = rng.integers(0, filled, batch["history_slot"].shape)
        out["history_slot"] = order[picks].astype(np.int32)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, config = cli.parse_config_args(_parser(), argv)
    if not 0 < args.fill <= 1:
        sys.exit(f"error: --fill {args.fill} must lie in (0, 1]: the share of filled slots.")
    mesh, rows = common.set_up_random_steps(config)
    items = rows if args.items is None else args.items
    local = partly_filled(common.random_batch(config, rows, items), args.fill)
    batch = sharding.global_batch(mesh, local)
    model = recommender.build_model(config.model)
    setup = train_step.build_train_state(config, model, mesh, batch, 10 * args.steps)

    def compile_step():
        jitted = train_step.jit_train_step(model, setup, mesh, local, config.model.dtype)
        return jitted.lower(setup.state, batch).compile()

    chunks = layers.item_block_chunks(items)
    if chunks == 1:
        print(
            f"note: a block of {items} slots is encoded in one go either way (chunks need "
            f"JAX's CPU backend and {schema.BLOCK_CHUNKS * schema.MIN_CHUNK_ITEMS} slots or "
            f"more, a multiple of {schema.BLOCK_CHUNKS}); raise --items, or run on a CPU.",
            file=sys.stderr,
        )
    compiled = {"chunks": compile_step()}
    library_rule = schema.block_chunks
    schema.block_chunks = lambda num_slots: 1  # the model reads it while tracing
    try:
        compiled["one_go"] = compile_step()
    finally:
        schema.block_chunks = library_rule

    state = setup.state
    wall = {name: [] for name in compiled}
    for call in range(args.warmup + args.steps):
        for name, step in compiled.items():  # each continues from the other's state
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(step(state, batch))
            if call >= args.warmup:
                wall[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) * 1e3 for name, times in wall.items()}
    filled = np.flatnonzero(local["items"]["item_index"] >= 0)
    report = {
        "benchmark": "block_chunks",
        "config": args.config,
        "overrides": split_overrides(argv)[1],
        "towers": config.model.towers,
        "text_mode": config.model.text.mode,
        "content_in_step": schema.content_in_step(config.model.towers, config.model.text.mode),
        "dtype": config.model.dtype,
        "rows": rows,
        "items": items,
        "fill": args.fill,
        "chunks": chunks,
        "empty_chunks": chunks - np.unique(filled % chunks).size,
        "steps": args.steps,
        "step_ms_median": {name: round(ms, 1) for name, ms in medians.items()},
        "step_ms_min": {name: round(min(t) * 1e3, 1) for name, t in wall.items()},
        "chunks_over_one_go": round(medians["chunks"] / medians["one_go"], 3),
        # The chunks' lax.conds, as XLA compiled them: none in the one-go program.
        "conditionals": {
            name: step.as_text().count(" conditional(") for name, step in compiled.items()
        },
        **common.machine(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    runtime.restart_with_huge_pages()
    common.report_errors(main)
