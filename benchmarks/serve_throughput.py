"""Serving throughput: scored (user, item) pairs per second, and full-catalogue top-K users/s.

    timeout 900 .venv/bin/python benchmarks/serve_throughput.py --config configs/default.py \\
        [--config.KEY=VALUE ...] [--catalogue 1000] [--users_per_call N] [--k 10]

Pairs: the jitted forward pass of `mmrec_jax.predict.make_predict_fn` on random batches
of `train.batch_size` rows, each with its own item (every item tower runs on every
row's item, as when scoring fresh pairs).

Top-K: a random catalogue of `--catalogue` items is encoded once
(`mmrec_jax.evaluate.encode_catalogue`, `--encode_chunk` items per call); then
`--users_per_call` users at a time are scored against every item
(`mmrec_jax.evaluate.grid_logits`, with each user's history of `data.history_len`
catalogue items) and `mmrec_jax.metrics.top_k_items` picks each user's K best, all in
one jitted call: evaluation's own ranking program (`evaluate.programs_of(model).rank`).
Users/s counts those calls only; the encoding rate is reported beside it.

Parameters are initialised as training does (`mmrec_jax.train_step.build_train_state`, the
pretrained BERT included). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import common
import jax
import numpy as np

from mmrec_jax import cli, evaluate, predict, runtime, schema, sharding, train_step
from mmrec_jax.models import recommender


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_config_argument(parser)
    common.add_step_arguments(parser, warmup=0)
    parser.add_argument(
        "--catalogue", type=common.at_least(1), default=1000, help="items in the catalogue"
    )
    parser.add_argument(
        "--encode_chunk", type=common.at_least(1), default=256, help="items per encode call"
    )
    parser.add_argument(
        "--users_per_call",
        type=common.at_least(1),
        default=None,
        help="users per top-K call (default: as evaluation, ROWS_PER_CALL // catalogue)",
    )
    parser.add_argument(
        "--k", type=common.at_least(1), default=10, help="items recommended per user"
    )
    return parser


def _timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of `steps` calls of `fn`, after a first
    (compiling) call and `warmup` more untimed ones."""
    for _ in range(1 + warmup):
        fn()
    wall, cpu = common.time_calls(fn, steps)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None) -> None:
    parser = _parser()
    args, config = cli.parse_config_args(parser, argv)
    if args.k > args.catalogue:
        parser.error(f"--k {args.k} is more than the --catalogue of {args.catalogue} items.")
    config.model.dtype = runtime.compute_dtype(config.model.dtype)  # "auto" -> this platform's
    runtime.tune_host_allocator()
    common.fill_vocab(config)
    config.model.num_items = max(config.model.num_items, args.catalogue)
    towers = schema.parse_towers(config.model.towers)
    mesh = sharding.make_mesh()
    rows = int(config.train.batch_size)
    local = common.random_batch(config, rows, rows)
    batch = sharding.global_batch(mesh, local)
    model = recommender.build_model(config.model)
    setup = train_step.build_train_state(config, model, mesh, batch, 1)
    params = setup.state["params"]

    # Pairs: the evaluation forward pass.
    predict_fn = predict.make_predict_fn(model, setup.shardings["params"])
    pair_s, pair_cpu = _timed(
        lambda: jax.block_until_ready(predict_fn(params, batch)), args.steps, args.warmup
    )

    # Catalogue: every item encoded once, as evaluation and export do.
    catalogue = common.random_batch(config, 1, args.catalogue, seed=1)["items"]
    catalogue["item_id"] = np.arange(1, args.catalogue + 1, dtype=np.int32)

    def encode_all():
        return evaluate.encode_catalogue(
            model,
            params,
            lambda rows: {key: value[rows] for key, value in catalogue.items()},
            args.catalogue,
            mesh,
            items_per_call=args.encode_chunk,
        )

    encoded = jax.device_put(encode_all())
    encode_s, _ = _timed(encode_all, max(1, args.steps // 5), args.warmup)
    encoded_items = args.catalogue

    # Top-K: users x catalogue grids.
    users = args.users_per_call or max(1, evaluate.ROWS_PER_CALL // args.catalogue)
    rng = np.random.default_rng(2)
    user_rows = {"user_id": rng.integers(1, config.model.num_users + 1, users).astype(np.int32)}
    if "history" in towers:
        history = (users, int(config.data.history_len))
        user_rows["history_slot"] = rng.integers(0, encoded_items, history).astype(np.int32)
        user_rows["history_mask"] = np.ones(history, bool)

    # Evaluation's ranking program: excluded items (none here; the masking costs the same
    # whatever is excluded) ranked last, then each user's K best and a NaN check.
    rank = functools.partial(evaluate.programs_of(model).rank, top=args.k)
    exclude = np.zeros((users, encoded_items), bool)
    top_s, top_cpu = _timed(
        lambda: jax.block_until_ready(rank(params, encoded, user_rows, exclude)),
        args.steps,
        args.warmup,
    )
    result = {
        "benchmark": "serve_throughput",
        "config": args.config,
        "towers": config.model.towers,
        "text_mode": config.model.text.mode,
        "dtype": config.model.dtype,
        "pair_batch": rows,
        "pairs_per_s": round(rows / pair_s, 1),
        "pair_batch_ms": round(pair_s * 1e3, 1),
        "pair_batch_cpu_ms": round(pair_cpu * 1e3, 1),
        "catalogue": encoded_items,
        "encode_items_per_s": round(encoded_items / encode_s, 1),
        "users_per_call": users,
        "k": args.k,
        "topk_users_per_s": round(users / top_s, 2),
        "topk_scored_pairs_per_s": round(users * encoded_items / top_s, 1),
        "topk_call_ms": round(top_s * 1e3, 1),
        "topk_call_cpu_ms": round(top_cpu * 1e3, 1),
        **common.machine(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    runtime.restart_with_huge_pages()
    common.report_errors(main)
