"""Shared pieces of the throughput benchmarks: configs, random batches, timing, peak, memory.

Imported by `train_throughput.py` and `serve_throughput.py` (run them from the
repository root; this folder is on `sys.path` as the scripts' own folder).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmrec_jax import runtime, schema, sharding, train_step
from mmrec_jax.models.text import cached_text_dim

# ID-vocabulary sizes used when the config leaves them to the dataset (0).
DEFAULT_VOCAB = 1000

# Matrix-multiply shapes (M, K, N) timed for the peak on a CPU: square ones and BERT's.
PEAK_SHAPES = ((2048, 2048, 2048), (1024, 384, 1536), (1024, 1536, 384), (4096, 1024, 1024))
# On a GPU or TPU: shapes large enough to keep every core busy.
ACCELERATOR_PEAK_SHAPES = ((8192, 8192, 8192), (16384, 4096, 4096), (4096, 16384, 4096))

# Architectures (`config.json` fields) for checkpoints with random weights, so that a
# model's shapes can be timed where the model hub cannot be reached: throughput does not
# depend on the weights.
RANDOM_BERT_ARCHITECTURES = {
    "bert-base-uncased": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
}
# Their tokenizer by default: all-MiniLM-L6-v2 (installed as a package) has
# bert-base-uncased's vocabulary.
RANDOM_BERT_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"


def fill_vocab(config: ml_collections.ConfigDict) -> None:
    """Sets `model.num_users` / `model.num_items` to `DEFAULT_VOCAB` where they are 0."""
    for key in ("num_users", "num_items"):
        if config.model[key] == 0:
            config.model[key] = DEFAULT_VOCAB


def set_up_random_steps(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, int]:
    """Prepares a process to time `config`'s step on random batches: (mesh, rows).

    Applies the CPU host settings training uses (`train_step.set_up_cpu_host`), resolves
    `model.dtype` "auto" to this platform's, fills unset ID vocabularies and checks that
    the batch's rows divide over the devices.
    """
    train_step.set_up_cpu_host(config)
    config.model.dtype = runtime.compute_dtype(config.model.dtype)
    mesh = sharding.make_mesh()
    rows = int(config.train.batch_size)
    train_step.check_batch_divides(rows, mesh.size)
    fill_vocab(config)
    return mesh, rows


def batch_dims(config: ml_collections.ConfigDict, rows: int, items: int) -> dict[str, int]:
    """The schema's symbol sizes for `rows` rows and an item block of `items` items."""
    return schema.batch_dims(config, rows, items, cached_text_dim(config.model))


def random_bert_folder(
    architecture: dict, folder: str | os.PathLike, tokenizer_source: str = RANDOM_BERT_TOKENIZER
) -> str:
    """Writes a BERT checkpoint of `architecture` with random weights into `folder`.

    Args:
      architecture: `config.json` fields, e.g. `RANDOM_BERT_ARCHITECTURES["bert-base-uncased"]`.
      folder: where to write config.json, model.safetensors and the tokenizer.
      tokenizer_source: the hub id or folder of the tokenizer saved beside the weights; its
        vocabulary must fit `vocab_size`.

    Returns:
      The folder, for `config.model.text.model`.
    """
    from mmrec_jax.models.bert import Bert, BertConfig
    from mmrec_jax.models.bert_weights import load_tokenizer, save_pretrained

    bert_config = BertConfig.from_dict(architecture, has_pooler=True)
    tokenizer = load_tokenizer(tokenizer_source)
    if len(tokenizer) > bert_config.vocab_size:
        raise ValueError(
            f"The tokenizer of {tokenizer_source} has {len(tokenizer)} tokens, more than the "
            f"architecture's vocab_size {bert_config.vocab_size}."
        )
    bert = Bert(bert_config)
    ids = np.zeros((1, 1), np.int32)
    shapes = jax.eval_shape(lambda: bert.init(jax.random.key(0), ids, ids))["params"]
    generator = np.random.default_rng(0)

    def draw(path, spec) -> np.ndarray:
        """BERT's own initialisation (transformers' too): N(0, initializer_range) weights,
        zero biases, unit LayerNorm scales. Drawn by numpy: XLA would compile a random
        kernel per weight, which takes longer than drawing them."""
        name = path[-1].key
        if name == "bias":
            return np.zeros(spec.shape, np.float32)
        if name == "scale":
            return np.ones(spec.shape, np.float32)
        weights = generator.standard_normal(spec.shape, np.float32)
        return weights * np.float32(bert_config.initializer_range)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    save_pretrained(params, bert_config, folder, tokenizer)
    return str(folder)


def random_batch(config: ml_collections.ConfigDict, rows: int, items: int, seed: int = 0):
    """A batch of the config's shapes with random content, following `mmrec_jax.schema`.

    Row r's candidate is item r % items; history slots are random items of the block;
    every item has every modality and every token is real.
    """
    towers = schema.parse_towers(config.model.towers)
    dims = batch_dims(config, rows, items)
    rng = np.random.default_rng(seed)
    vocab = {"user_id": config.model.num_users, "item_id": config.model.num_items}

    def value(spec: schema.FieldSpec) -> np.ndarray:
        shape = tuple(s if isinstance(s, int) else dims[s] for s in spec.shape)
        if spec.name in vocab:
            return rng.integers(1, vocab[spec.name] + 1, shape).astype(np.int32)
        if spec.name == "item_slot":
            return (np.arange(rows) % items).astype(np.int32)
        if spec.name == "history_slot":
            return rng.integers(0, items, shape).astype(np.int32)
        if spec.name == "text_ids":
            return rng.integers(1000, 30000, shape).astype(np.int32)
        if spec.name == "label":
            return rng.integers(0, 2, shape).astype(np.float32)
        if spec.name == "image":
            return rng.integers(0, 256, shape).astype(np.uint8)
        if spec.name == "audio":
            return rng.uniform(-1, 1, shape).astype(np.float32)
        if spec.name == "text_embedding":
            return rng.standard_normal(shape).astype(np.float32)
        if spec.dtype == "bool" or spec.name in ("weight", "text_mask"):
            return np.ones(shape, spec.dtype)
        if spec.name in ("user_index", "item_index"):
            return np.arange(shape[0], dtype=np.int32)
        raise ValueError(f"random_batch does not know how to fill field {spec.name!r}.")

    batch = {spec.name: value(spec) for spec in schema.row_fields(towers)}
    text_mode = config.model.text.mode
    batch["items"] = {spec.name: value(spec) for spec in schema.item_fields(towers, text_mode)}
    return batch


class CompileCounter:
    """Counts XLA compilations (and sums compile-time phases) per function name.

    Creating one turns JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR)
    off for the process: a program read back from it would count as a compilation
    timed by the read.
    """

    PHASES = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_enable_compilation_cache", False)
        # JAX 0.12 decides once per process whether to use the cache: forget that answer.
        compilation_cache.reset_cache()
        self.compiles: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self.phases: collections.Counter = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs) -> None:
        if event not in self.PHASES:
            return
        name = str(kwargs.get("fun_name", ""))
        self.seconds[name] += duration
        self.phases[(name, event.rsplit("/", 1)[-1])] += duration
        if event == self.PHASES[-1]:
            self.compiles[name] += 1

    def count(self, name: str) -> int:
        """Backend compilations of functions whose name contains `name`."""
        return sum(n for fun, n in self.compiles.items() if name in fun)

    def compile_seconds(self, name: str) -> float:
        """Tracing + lowering + XLA compilation seconds of those functions."""
        return sum(s for fun, s in self.seconds.items() if name in fun)

    def phase_seconds(self, name: str) -> dict[str, float]:
        """Those seconds per phase (jaxpr trace, MLIR lowering, XLA compile)."""
        phases: collections.Counter = collections.Counter()
        for (fun, phase), seconds in self.phases.items():
            if name in fun:
                phases[phase.removesuffix("_duration")] += seconds
        return {phase: round(seconds, 2) for phase, seconds in phases.items()}


def time_calls(fn: Callable[[], object], steps: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of `steps` calls of `fn` (which blocks).

    CPU seconds add up every thread of the process, so they vary less than the wall
    time when other jobs share the cores; their ratio is the cores the step kept busy.
    """
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def add_step_arguments(parser: argparse.ArgumentParser, steps: int = 10, warmup: int = 2) -> None:
    """Adds `--steps` (timed calls, at least 1) and `--warmup` (untimed calls before them,
    after the first, compiling, call) to a benchmark's parser."""
    parser.add_argument(
        "--steps", type=at_least(1), default=steps, help=f"timed calls (default {steps})"
    )
    parser.add_argument(
        "--warmup",
        type=at_least(0),
        default=warmup,
        help=f"untimed calls before them, after the compiling one (default {warmup})",
    )


def at_least(low: int):
    """An argparse `type`: an integer >= `low`, else a usage error naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value

    return parse


def significant(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (FLOP counts of tiny and huge models)."""
    return float(f"{value:.{digits}g}")


def _errors_naming_their_fix() -> tuple[type[Exception], ...]:
    """The library's errors whose message says the fix (a bad config value or batch, a
    dataset that is not there), the input pipeline's only where it was imported: a
    benchmark on random batches runs without its packages."""
    from mmrec_jax.config import ConfigError
    from mmrec_jax.schema import BatchError

    errors = [ConfigError, BatchError]
    pipeline = sys.modules.get("mmrec_jax.data.pipeline")
    if pipeline is not None:
        errors += [pipeline.DatasetNotBuiltError, pipeline.DatasetMismatchError]
    return tuple(errors)


def report_errors(main) -> None:
    """Runs a benchmark's `main`, ending with one line on the library's errors that name
    their fix (a bad config value, a dataset or text model that is not there)."""
    from mmrec_jax.hub import PretrainedModelNotFound

    try:
        main()
    except PretrainedModelNotFound as error:
        sys.exit(
            f"error: {error}\nOr run without it: --random_text_weights gives the text tower "
            "random weights of the same architecture."
        )
    except _errors_naming_their_fix() as error:
        sys.exit(f"error: {error}")


def best_matmul_rate(shapes, make_call: Callable[[int, int, int], Callable], repeats: int = 7):
    """The fastest of the median matrix-multiply rates over `shapes`.

    Args:
      shapes: (M, K, N) triples.
      make_call: (M, K, N) -> a call that computes one (M, K) x (K, N) product and
        blocks until it is done; called once untimed, then `repeats` times timed.
      repeats: timed calls per shape.

    Returns:
      {"gflops_per_s": best median GFLOP/s, "shape": its (M, K, N)}.
    """
    best = {"gflops_per_s": 0.0, "shape": None}
    for m, k, n in shapes:
        call = make_call(m, k, n)
        call()
        median = statistics.median(time_calls(call, repeats)[0])
        rate = 2.0 * m * k * n / median / 1e9
        if rate > best["gflops_per_s"]:
            best = {"gflops_per_s": round(rate, 1), "shape": [m, k, n]}
    return best


def matmul_peak(dtype=jnp.float32, repeats: int = 7) -> dict:
    """The best float32 (or `dtype`) matrix-multiply rate of this machine, under jit.

    Times `jnp.dot` on `PEAK_SHAPES` (`ACCELERATOR_PEAK_SHAPES` on a GPU or TPU) and
    returns the fastest shape's median rate.

    Returns:
      {"gflops_per_s": best median GFLOP/s, "shape": its (M, K, N), "dtype": name}.
    """
    dot = jax.jit(jnp.dot)

    def make_call(m: int, k: int, n: int) -> Callable:
        a = jax.random.normal(jax.random.key(0), (m, k), dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), dtype)
        return lambda: jax.block_until_ready(dot(a, b))

    shapes = PEAK_SHAPES if jax.default_backend() == "cpu" else ACCELERATOR_PEAK_SHAPES
    return {**best_matmul_rate(shapes, make_call, repeats), "dtype": jnp.dtype(dtype).name}


def _mib(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 3)


def memory_report(compiled: jax.stages.Compiled, **trees) -> dict:
    """Memory of a compiled step: XLA's buffers for one device, the given trees, the peaks.

    Args:
      compiled: the compiled step (`jitted.lower(...).compile()`).
      **trees: named pytrees of arrays or `jax.ShapeDtypeStruct`s (the parameters, the
        optimizer state, ...), each reported as `<name>_mib`, the size of the whole tree
        over every device.

    Returns:
      MiB: `<name>_mib` per tree; from XLA's buffer assignment of one device's program,
      `xla_arguments_mib` (its inputs), `xla_outputs_mib`, `xla_aliased_mib` (outputs
      written into donated inputs), `xla_temporaries_mib` (activations and workspace)
      and `xla_total_mib` (arguments + outputs - aliased + temporaries: the device memory
      the step needs); `host_peak_rss_mib` (this process's peak resident memory), and
      `device_peak_mib` where the device counts its own (GPU, TPU).
    """
    report = {
        f"{name}_mib": _mib(
            sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
        )
        for name, tree in trees.items()
    }
    stats = compiled.memory_analysis()
    if stats is not None:
        arguments = stats.argument_size_in_bytes
        outputs = stats.output_size_in_bytes
        aliased = stats.alias_size_in_bytes
        temporaries = stats.temp_size_in_bytes
        report.update(
            xla_arguments_mib=_mib(arguments),
            xla_outputs_mib=_mib(outputs),
            xla_aliased_mib=_mib(aliased),
            xla_temporaries_mib=_mib(temporaries),
            xla_total_mib=_mib(arguments + outputs - aliased + temporaries),
        )
    # Linux reports the peak resident set in KiB.
    report["host_peak_rss_mib"] = _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    device_stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in device_stats:
        report["device_peak_mib"] = _mib(device_stats["peak_bytes_in_use"])
    return report


def machine() -> dict:
    """Where the numbers were measured."""
    devices = jax.devices()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "platform": devices[0].platform,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": None if load is None else round(load, 2),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
