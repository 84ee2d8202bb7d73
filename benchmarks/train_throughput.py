"""Throughput of the jit-compiled train step (or of the forward pass) on one batch shape.

    timeout 900 .venv/bin/python benchmarks/train_throughput.py --config configs/seed.py \\
        --config.model.text.model=sentence-transformers/all-MiniLM-L6-v2 \\
        --config.train.batch_size=32 [--steps 10] [--inference] [--pipeline] [--profile DIR]

Builds the model and its sharded train state exactly as training does
(`mmrec_jax.train_step.build_train_state`, the pretrained BERT included), jits
`mmrec_jax.train_step.make_train_step` with the training loop's shardings and donation, and
times `--steps` steps after `--warmup` untimed ones. Batches are random, of the config's
shapes (`mmrec_jax.schema`): `train.batch_size` rows and an item block of `--items`
items (default: one item per row, as in the original design, where every sample carries
its own item; the history slots then point at items of that block). `--pipeline` feeds
the real input pipeline instead (`mmrec_jax.data.pipeline.make_batches`, the dataset is
built on first use); its item block holds every candidate and history item of the batch,
and the step time then includes fetching the batch. `--inference` times the jitted
forward pass of `mmrec_jax.predict.make_predict_fn` instead (dropout off, no gradients).

FLOPs are the model's matmul and convolution FLOPs counted from its shapes
(`mmrec_jax.flops`), cross-checked against XLA's cost analysis of the compiled step
(`counted_over_xla`). XLA's count adds the elementwise work and the optimizer, and
counts some fused operations its own way: on the MiniLM shapes the two agree within 2%
either way; on tiny models, where elementwise work is a large share, XLA's is larger. A
trained BERT over an item block of 512 or more slots runs in a loop of block chunks
(`mmrec_jax.schema.BLOCK_CHUNKS`) whose body XLA counts once: `counted_over_xla` is then
about 8 (seen with `--items 0` and history). The image and audio towers' chunks are
unrolled, and counted in full. On a GPU XLA's count leaves out the matmuls it hands to
cuBLAS (seen: 0.57 of 15.84 GFLOP per sample, the seed's shapes on an H200).
The peak is the best `jnp.dot` rate of the step's compute dtype measured in the same
run, before and after the timed steps (for a bfloat16 model, the float32 rate is
reported beside it).

Memory (`memory` in the JSON, MiB): the parameters, optimizer state, whole train state and
batch; XLA's buffer assignment of the compiled step for one device (its arguments,
outputs, the outputs aliased to donated inputs, temporaries, and their total: what the
step needs on a device); the process's peak resident memory, and the device's own peak
where it keeps one (GPU, TPU).

`state_s` is the time the train state took to build: the parameters initialised, the
pretrained BERT read and placed, the optimizer state created.

`--compile_only` compiles the step on the train state's shapes and reports the FLOPs and
memory without allocating the state or running it: whether a config fits a device.

`--profile DIR` traces `--profile_steps` more steps with `jax.profiler` after the timed
ones (`mmrec_jax.profiling`), for XProf (`xprof --logdir DIR`) or https://ui.perfetto.dev.

The step must compile exactly once: the benchmark counts XLA compilations of it and
exits with an error after printing its results if there was a second. Prints one JSON
line last.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import common
import jax

from mmrec_jax import cli, predict, profiling, runtime, schema, sharding, train_step
from mmrec_jax import flops as flops_lib
from mmrec_jax.config import split_overrides
from mmrec_jax.models import recommender

# The jitted functions' names, as the compile counter sees them.
STEP_NAME = "train_step"
PREDICT_NAME = "predict"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_config_argument(parser, "configs/seed.py")
    common.add_step_arguments(parser)
    parser.add_argument(
        "--items",
        type=common.at_least(0),
        default=None,
        help="items in the item block (default: one per row; 0: the pipeline's capacity, "
        "every candidate and history item distinct)",
    )
    parser.add_argument("--pipeline", action="store_true", help="real input pipeline")
    parser.add_argument("--inference", action="store_true", help="forward pass only")
    parser.add_argument("--no_peak", action="store_true", help="skip the matmul peak")
    parser.add_argument(
        "--compile_only",
        action="store_true",
        help="compile the step on the state's shapes and report its FLOPs and memory "
        "without allocating the state or running: does a config fit a device?",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="after the timed steps, trace --profile_steps more with jax.profiler into DIR",
    )
    parser.add_argument(
        "--profile_steps", type=common.at_least(1), default=3, help="steps traced by --profile"
    )
    parser.add_argument(
        "--random_text_weights",
        action="store_true",
        help="give the text tower a checkpoint of config.model.text.model's architecture "
        f"with random weights (known: {', '.join(common.RANDOM_BERT_ARCHITECTURES)}), "
        "written to a temporary folder: runs the seed shapes without the model hub",
    )
    parser.add_argument(
        "--random_text_tokenizer",
        default=common.RANDOM_BERT_TOKENIZER,
        metavar="NAME_OR_FOLDER",
        help="the tokenizer saved with --random_text_weights (hub id or a folder of its "
        "files; its vocabulary must fit the architecture's)",
    )
    parser.add_argument(
        "--default_malloc",
        action="store_true",
        help="keep glibc's default allocator settings (see mmrec_jax.runtime)",
    )
    parser.add_argument(
        "--async_dispatch",
        action="store_true",
        help="keep JAX's asynchronous CPU dispatch where train.py would run the step "
        "inline (fine-tuned text; see mmrec_jax.train_step.runs_inline)",
    )
    return parser


def _batches(args, config, mesh):
    """(config, first local batch, iterator of local batches, item block size)."""
    if args.pipeline:
        from mmrec_jax import train
        from mmrec_jax.data import pipeline

        pipeline.ensure_dataset(config.data)
        info = pipeline.load_dataset_info(config.data)
        config = train.resolve_config(config, info)
        # Epoch after epoch, however many steps are timed.
        iterator = iter(pipeline.make_batches(config, "train", train=True, num_epochs=None))
        first = next(iterator)
        return config, first, iterator, first["items"]["item_id"].shape[0]
    common.fill_vocab(config)
    rows = int(config.train.batch_size)
    if args.items == 0:
        towers = schema.parse_towers(config.model.towers)
        items = schema.item_capacity(
            rows,
            config.data.history_len,
            config.model.num_items,
            mesh.size,
            "history" in towers,
            schema.content_in_step(towers, config.model.text.mode),
        )
    else:
        items = rows if args.items is None else args.items
    batch = common.random_batch(config, rows, items)
    return config, batch, None, items


def _profile(args, step, name: str) -> str | None:
    """Traces `args.profile_steps` calls of `step` into `args.profile`; the trace folder."""
    trace = profiling.StepTrace(
        args.profile,
        first_step=1,
        num_steps=args.profile_steps,
        report=lambda line: print(line, file=sys.stderr),
    )
    try:
        for number in range(1, args.profile_steps + 1):
            trace.before_step(number, None)
            with jax.profiler.StepTraceAnnotation(name, step_num=number):
                step()  # blocks until the step is computed
            trace.after_step(None)
    finally:
        trace.close()
    folder = profiling.newest_trace(args.profile)
    return str(folder) if folder else None


def _measure(args, run, jitted, batch, iterator, mesh, counter, name: str, dtype) -> dict:
    """Runs and times the step: the first call (compiling), warm-up, timed steps, peaks."""
    peak_before = None if args.no_peak else common.matmul_peak(dtype)
    start = time.perf_counter()
    run(batch)
    first_call_s = time.perf_counter() - start
    # From here on the step must not be traced again; if it is, JAX logs what differed.
    explain = jax.config.jax_explain_cache_misses
    jax.config.update("jax_explain_cache_misses", True)
    for _ in range(args.warmup):
        run(batch)
    data_times = []

    def timed_step():
        nonlocal batch
        if iterator is not None:
            fetch = time.perf_counter()
            batch = sharding.global_batch(mesh, next(iterator))
            data_times.append(time.perf_counter() - fetch)
        run(batch)

    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times, cpu_times = common.time_calls(timed_step, args.steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    profile = _profile(args, timed_step, name) if args.profile else None
    jax.config.update("jax_explain_cache_misses", explain)
    peak_after = None if args.no_peak else common.matmul_peak(dtype)
    peak_float32 = None
    if not args.no_peak and jax.numpy.dtype(dtype) != jax.numpy.float32:
        peak_float32 = common.matmul_peak()
    return {
        "times": times,
        "cpu_times": cpu_times,
        "minor_faults": faults,
        "data_times": data_times,
        "first_call_s": first_call_s,
        "compile_s": counter.compile_seconds(name),
        "compile_phases": counter.phase_seconds(name),
        "compiles": counter.count(name),
        "jit_cache_size": getattr(jitted, "_cache_size", lambda: None)(),
        "profile": profile,
        "peaks": [p for p in (peak_before, peak_after) if p],
        "peak_float32": peak_float32,
    }


def _rates(args, measured: dict, flops: float, rows: int) -> dict:
    """The result fields of a measured run: step times, compilations, FLOP rate, peak."""
    times, data_times = measured["times"], measured["data_times"]
    median = statistics.median(times)
    gflops_per_s = flops / median / 1e9
    peaks = [p["gflops_per_s"] for p in measured["peaks"]]
    best_peak = max(measured["peaks"], key=lambda p: p["gflops_per_s"]) if peaks else None
    peak = best_peak["gflops_per_s"] if best_peak else None
    peak_float32 = measured["peak_float32"]
    return {
        "steps": args.steps,
        "samples_per_s": round(rows / median, 2),
        "step_ms_median": round(median * 1e3, 1),
        "step_ms_min": round(min(times) * 1e3, 1),
        "step_ms_max": round(max(times) * 1e3, 1),
        "cpu_ms_median": round(statistics.median(measured["cpu_times"]) * 1e3, 1),
        # Pages the process touched for the first time (4 KiB or 2 MiB each) during the
        # timed steps: memory the allocator handed back and took again (mmrec_jax.runtime).
        "minor_faults_per_step": round(measured["minor_faults"] / args.steps),
        "data_ms_median": round(statistics.median(data_times) * 1e3, 1) if data_times else None,
        "compile_s": round(measured["compile_s"], 2),
        "compile_phases_s": measured["compile_phases"],
        "first_call_s": round(measured["first_call_s"], 2),
        "compiles": measured["compiles"],
        "jit_cache_size": measured["jit_cache_size"],
        "gflops_per_s": round(gflops_per_s, 1),
        # The peak of the step's compute dtype (bfloat16 for a bfloat16 model).
        "peak_gflops_per_s": peak,
        "peak_shape": best_peak["shape"] if best_peak else None,  # the shape of `peak`
        "peak_before_after": peaks,
        "fraction_of_peak": round(gflops_per_s / peak, 3) if peak else None,
        "peak_float32": peak_float32,  # for another compute dtype: the float32 peak too
        "fraction_of_float32_peak": (
            round(gflops_per_s / peak_float32["gflops_per_s"], 3) if peak_float32 else None
        ),
        "profile": measured["profile"],
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, config = cli.parse_config_args(_parser(), argv)
    overrides = split_overrides(argv)[1]
    native_gpu_atomics = runtime.use_native_gpu_atomics()
    tuned_malloc, inline = train_step.set_up_cpu_host(
        config, tune_allocator=not args.default_malloc, inline=not args.async_dispatch
    )
    config.model.dtype = runtime.compute_dtype(config.model.dtype)  # "auto" -> this platform's
    counter = common.CompileCounter()
    if args.random_text_weights:
        name = config.model.text.model
        if name not in common.RANDOM_BERT_ARCHITECTURES:
            sys.exit(
                f"--random_text_weights knows {', '.join(common.RANDOM_BERT_ARCHITECTURES)}, "
                f"not {name!r}."
            )
        folder = tempfile.mkdtemp(prefix="random-bert-")
        atexit.register(shutil.rmtree, folder, True)
        common.random_bert_folder(
            common.RANDOM_BERT_ARCHITECTURES[name], folder, args.random_text_tokenizer
        )
        config.model.text.model = folder
    mesh = sharding.make_mesh()
    train_step.check_batch_divides(int(config.train.batch_size), mesh.size)
    config, local, iterator, items = _batches(args, config, mesh)
    rows = int(config.train.batch_size)
    batch = sharding.global_batch(mesh, local)
    model = recommender.build_model(config.model)
    start = time.perf_counter()
    setup = train_step.build_train_state(
        config, model, mesh, batch, max(args.steps, 1) * 10, abstract=args.compile_only
    )
    state = jax.block_until_ready(setup.state)
    state_s = time.perf_counter() - start

    if args.inference:
        name = PREDICT_NAME
        jitted = predict.make_predict_fn(model, setup.shardings["params"])
        params = state["params"]

        def run(batch):
            return jax.block_until_ready(jitted(params, batch))

    else:
        name = STEP_NAME
        jitted = train_step.jit_train_step(model, setup, mesh, local, config.model.dtype)

        def run(batch):
            nonlocal state
            state, metrics = jitted(state, batch)
            return jax.block_until_ready((state, metrics))

    measured = None
    if not args.compile_only:
        measured = _measure(
            args, run, jitted, batch, iterator, mesh, counter, name, config.model.dtype
        )
    start = time.perf_counter()
    lowered = jitted.lower(state["params"], batch) if args.inference else jitted.lower(state, batch)
    compiled = lowered.compile()
    lower_and_compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts one device's program: times the devices (replicated work, such as the
    # optimizer update under replicated parameters, is then counted once per device).
    xla_flops = float(cost.get("flops", 0.0)) * mesh.size if cost else 0.0
    dims = common.batch_dims(config, rows, items)
    shape = flops_lib.BatchShape(
        rows=rows,
        items=items,
        text_len=dims["L"],
        history_len=dims["H"],
        text_dim=dims.get("Dt", 0),
    )
    counted = flops_lib.count_flops(config.model, shape, model.bert_config)
    counted = counted["forward" if args.inference else "train"]
    result = {
        "benchmark": "train_throughput",
        "mode": "inference" if args.inference else "train",
        "config": args.config,
        "overrides": [f"{key}={value}" for key, value in overrides],
        "text_mode": config.model.text.mode,
        "text_weights": "random" if args.random_text_weights else "pretrained",
        "towers": config.model.towers,
        "dtype": config.model.dtype,
        "rows": rows,
        "items": items,
        "tokens": dims["L"],
        "input": "pipeline" if args.pipeline else "random",
        "compile_only": args.compile_only,
        "gflop_per_sample": common.significant(counted["total"] / rows / 1e9),
        "gflop_per_sample_by_part": {
            k: common.significant(v / rows / 1e9) for k, v in counted.items() if k != "total"
        },
        "xla_gflop_per_sample": common.significant(xla_flops / rows / 1e9),
        "counted_over_xla": round(counted["total"] / xla_flops, 3) if xla_flops else None,
        "state_s": round(state_s, 2),
    }
    if measured is None:
        result["compile_s"] = round(lower_and_compile_s, 2)
    else:
        result.update(_rates(args, measured, counted["total"], rows))
    result.update(
        {
            "memory": common.memory_report(
                compiled,
                params=state["params"],
                **({} if args.inference else {"optimizer": state["opt_state"], "state": state}),
                batch=batch,
            ),
            "tuned_malloc": tuned_malloc,
            "inline_execution": inline,
            "native_gpu_atomics_option": native_gpu_atomics,
            "huge_pages": runtime.huge_pages_enabled(),
            "compiler_options": runtime.compiler_options(config.model.dtype),
            "env": {
                k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "XLA_FLAGS") if k in os.environ
            },
            **common.machine(),
        }
    )
    print(json.dumps(result), flush=True)
    if measured is not None and measured["compiles"] != 1:
        compiles = measured["compiles"]
        sys.exit(
            f"The {name} function compiled {compiles} times; it must compile once (JAX's "
            "explanation of what differed from the first call is logged above)."
        )


if __name__ == "__main__":
    if "--default_malloc" not in sys.argv:
        runtime.restart_with_huge_pages()
    common.report_errors(main)
