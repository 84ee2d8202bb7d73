"""XLA compiler options and plain layers against the library's: one step compiled under
each, one process.

    python benchmarks/compiler_options.py --config configs/seed.py \\
        --config.model.text.model=sentence-transformers/all-MiniLM-L6-v2 \\
        --config.train.batch_size=32 \\
        --variant 'onednn={"xla_cpu_use_onednn": true}' [--variant NAME=JSON ...] \\
        [--plain dense] [--plain max_pool] [--inference | --encode [--items N]] [--steps 10]

Compiles the config's train step (with `--inference`, the forward pass of
`mmrec_jax.predict` over one random batch; with `--encode`, evaluation's item encoding,
`mmrec_jax.evaluate.make_encode_fn`, over a random block of `--items` items) under the
options the library gives that program (`runtime.compiler_options`; a forward pass through
a content network has `runtime.CONTENT_FORWARD_CPU_COMPILER_OPTIONS`), as "library", and
under each `--variant`: the library's options updated with the variant's JSON object (a
null value removes an option), and under each `--plain` fast path: the library's
options with that fast path of `mmrec_jax.models.layers` swapped for its plain form
(`dense`: `dense_product` as `lax.dot_general`, whose kernel gradient autodiff computes;
`max_pool`: `flax.linen.max_pool`), as "plain_NAME". Then calls the programs in turn, so
that each is timed under the same machine state: on a shared 2-core machine separate runs
of one program differ by 10-30%, more than most option changes. An option the installed
XLA does not accept is an error. Prints one JSON line last: each variant's options and its
call's median and minimum milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from unittest import mock

import common
import flax.linen as nn
import jax
import numpy as np

from mmrec_jax import cli, evaluate, predict, runtime, sharding, train_step
from mmrec_jax.config import split_overrides
from mmrec_jax.models import layers, recommender

LIBRARY = "library"


def _plain_dense_product(x, kernel, precision=None):
    """`layers.dense_product` without its custom gradient: `lax.dot_general` itself."""
    dimensions = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, kernel, dimensions, precision=precision)


def _plain_max_pool(x, window):
    """`layers._max_pool` as `flax.linen.max_pool` (reduce_window, select_and_scatter)."""
    spatial = (window,) * (x.ndim - 2)
    return nn.max_pool(x, spatial, strides=spatial, padding="VALID")


# --plain NAME: the attribute of `layers` a fast path is, and its plain form.
PLAIN_FORMS = {
    "dense": ("dense_product", _plain_dense_product),
    "max_pool": ("_max_pool", _plain_max_pool),
}


def _variant(text: str) -> tuple[str, dict]:
    name, sep, options = text.partition("=")
    try:
        parsed = json.loads(options) if sep else None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{options!r} is not a JSON object: {error}") from None
    if not name or name == LIBRARY or not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: write NAME={{JSON object of XLA options}}, a name other "
            f"than {LIBRARY!r}, e.g. 'onednn={{\"xla_cpu_use_onednn\": true}}'."
        )
    return name, parsed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_config_argument(parser)
    common.add_step_arguments(parser)
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        help="NAME=JSON: XLA options to change from the library's (repeatable)",
    )
    parser.add_argument(
        "--plain",
        choices=sorted(PLAIN_FORMS),
        action="append",
        default=[],
        help="a fast path of the model's layers to compile in its plain form (repeatable)",
    )
    program = parser.add_mutually_exclusive_group()
    program.add_argument(
        "--inference", action="store_true", help="the forward pass instead of the train step"
    )
    program.add_argument(
        "--encode", action="store_true", help="evaluation's item encoding instead of it"
    )
    parser.add_argument(
        "--items",
        type=common.at_least(1),
        default=evaluate.ITEMS_PER_CALL,
        help=f"items a --encode call encodes (default {evaluate.ITEMS_PER_CALL}, evaluation's)",
    )
    return parser


def variant_options(library: dict, changes: dict) -> dict:
    """The library's options updated with `changes` (a None value removes one)."""
    options = {**library, **changes}
    return {name: value for name, value in options.items() if value is not None}


def _compile(make_fn, options_of, options: dict, plain: str | None, args_of_call):
    """(`make_fn()` built while the library's compiler options, all of them, are
    `options` and, when `plain` names one, that fast path is its plain form, lowered and
    compiled; the options `options_of()`, the library's choice for the program, gave it)."""
    saved = runtime.CPU_COMPILER_OPTIONS, runtime.CONTENT_FORWARD_CPU_COMPILER_OPTIONS
    runtime.CPU_COMPILER_OPTIONS = runtime.CONTENT_FORWARD_CPU_COMPILER_OPTIONS = options
    runtime.compiler_options.cache_clear()  # it caches the options it found accepted
    try:
        used = options_of() or {}
        refused = sorted(set(options) - set(used))
        if refused:
            sys.exit(
                f"error: this XLA ({jax.__version__}, {jax.default_backend()}) does not accept "
                f"the option(s) {', '.join(refused)} for this program; the library's "
                "options apply on the CPU with float32 compute only."
            )
        swap = contextlib.nullcontext()
        if plain is not None:
            swap = mock.patch.object(layers, *PLAIN_FORMS[plain])
        with swap:
            return make_fn().lower(*args_of_call).compile(), used
    finally:
        runtime.CPU_COMPILER_OPTIONS, runtime.CONTENT_FORWARD_CPU_COMPILER_OPTIONS = saved
        runtime.compiler_options.cache_clear()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, config = cli.parse_config_args(_parser(), argv)
    if not args.variant and not args.plain:
        sys.exit("error: give at least one --variant NAME=JSON or --plain FAST_PATH.")
    names = [name for name, _ in args.variant] + [f"plain_{name}" for name in args.plain]
    if len(set(names)) != len(names):
        sys.exit(f"error: --variant names must differ; got {', '.join(names)}.")
    mesh, rows = common.set_up_random_steps(config)
    if args.encode:
        if args.items % mesh.size:
            sys.exit(f"error: --items {args.items} does not split over {mesh.size} devices.")
        config.model.num_items = max(config.model.num_items, args.items)
    local = common.random_batch(config, rows, rows)
    batch = sharding.global_batch(mesh, local)
    model = recommender.build_model(config.model)
    setup = train_step.build_train_state(config, model, mesh, batch, 10 * args.steps)
    state = setup.state
    if args.inference or args.encode:
        if args.inference:
            make_fn = functools.partial(predict.make_predict_fn, model, setup.shardings["params"])
            data = batch
        else:
            make_fn = functools.partial(evaluate.make_encode_fn, model)
            items = common.random_batch(config, 1, args.items, seed=1)["items"]
            items["item_id"] = np.arange(1, args.items + 1, dtype=np.int32)
            data = sharding.global_batch(mesh, items)
        options_of = functools.partial(predict.forward_compiler_options, model)
        call_args = (state["params"], data)
    else:
        make_fn = functools.partial(
            train_step.jit_train_step, model, setup, mesh, local, config.model.dtype
        )
        options_of = functools.partial(runtime.compiler_options, config.model.dtype)
        call_args = (state, batch)

    library = dict(options_of() or {})
    wanted = {LIBRARY: (library, None)}
    wanted.update(
        (name, (variant_options(library, changes), None)) for name, changes in args.variant
    )
    wanted.update((f"plain_{name}", (library, name)) for name in args.plain)
    compiled, options = {}, {}
    for name, (opts, plain) in wanted.items():
        compiled[name], options[name] = _compile(make_fn, options_of, opts, plain, call_args)
    wall = {name: [] for name in compiled}
    for call in range(args.warmup + args.steps):
        for name, program in compiled.items():  # each train step continues the last state
            start = time.perf_counter()
            if args.inference or args.encode:
                jax.block_until_ready(program(*call_args))
            else:
                state, _ = jax.block_until_ready(program(state, batch))
            if call >= args.warmup:
                wall[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) * 1e3 for name, times in wall.items()}
    report = {
        "benchmark": "compiler_options",
        "config": args.config,
        "overrides": split_overrides(argv)[1],
        "mode": "encode" if args.encode else "inference" if args.inference else "train",
        "dtype": config.model.dtype,
        "rows": args.items if args.encode else rows,
        "steps": args.steps,
        "options": options,
        "plain": {name: plain for name, (_, plain) in wanted.items() if plain is not None},
        "step_ms_median": {name: round(ms, 1) for name, ms in medians.items()},
        "step_ms_min": {name: round(min(t) * 1e3, 1) for name, t in wall.items()},
        "over_library": {name: round(ms / medians[LIBRARY], 3) for name, ms in medians.items()},
        **common.machine(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    runtime.restart_with_huge_pages()
    common.report_errors(main)
