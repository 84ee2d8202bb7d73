"""Input pipeline speed at the default config, beside the model's training speed.

    timeout 900 .venv/bin/python benchmarks/pipeline.py [--data_dir data] [--batches 40]

Builds `mmrec_synthetic` at the default size in --data_dir if needed, then measures:

- the item store: reading and decoding the whole item table (1200 images, 1200 clips)
  and loading the frozen MiniLM text embeddings (computed once, then from the cache);
- training batches per second, as examples/s, with everything in the calling thread
  (prefetch 0: the pipeline's own cost), with the default background prefetch thread,
  and with 2 Grain worker processes;
- one evaluation pass over the validation split;
- the model's training step on those batches (forward, backward, AdamW; jit-compiled,
  after warm-up), as examples/s.

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import optax  # noqa: E402

from configs import default  # noqa: E402
from mmrec_jax.data import pipeline  # noqa: E402
from mmrec_jax.models.recommender import build_model  # noqa: E402


def _rate(iterator, batches: int, batch_size: int, warmup: int = 3) -> float:
    """Examples/s over `batches` batches after `warmup` batches."""
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _train_rate(config, store, steps: int) -> tuple[float, float]:
    """(examples/s, compile s) of a jitted forward + backward + AdamW step."""
    info = store.info
    config.model.num_users, config.model.num_items = info.num_users, info.num_items
    batches = pipeline.make_batches(config, "train", train=True, item_store=store)
    batch = next(batches)
    model = build_model(config.model)
    params = model.init(jax.random.key(0), batch)["params"]
    optimizer = optax.adamw(config.train.learning_rate, weight_decay=config.train.weight_decay)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch, train=True, rngs={"dropout": rng})
            return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch, jax.random.key(0))
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for k in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, jax.random.key(k))
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    return config.train.batch_size / statistics.median(times), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT / "data"), help="dataset folder")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per setting")
    parser.add_argument("--steps", type=int, default=5, help="train steps timed")
    args = parser.parse_args()

    config = default.get_config()
    config.data.data_dir = args.data_dir
    size = config.train.batch_size
    result = {
        "benchmark": "pipeline",
        "config": "configs/default.py",
        "towers": config.model.towers,
        "batch": size,
        "history_len": config.data.history_len,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    start = time.perf_counter()
    pipeline.ensure_dataset(config.data)
    result["dataset_ready_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    store = pipeline.ItemStore(config)
    result["item_store_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    pipeline.ItemStore(config)
    result["item_store_cached_s"] = round(time.perf_counter() - start, 2)
    result["items"] = store.num_item_rows
    first = next(pipeline.make_batches(config, "train", train=True, item_store=store))
    result["item_block_slots"] = int(first["items"]["item_id"].shape[0])
    result["batch_mib"] = round(sum(a.nbytes for a in jax.tree.leaves(first)) / 2**20, 1)

    for name, overrides in (
        ("inline", {"prefetch": 0, "num_workers": 0}),
        ("prefetch_thread", {"prefetch": 2, "num_workers": 0}),
        ("workers_2", {"prefetch": 2, "num_workers": 2}),
    ):
        run = default.get_config()
        run.data.data_dir = args.data_dir
        run.data.prefetch, run.data.num_workers = overrides["prefetch"], overrides["num_workers"]
        iterator = pipeline.make_batches(run, "train", train=True, item_store=store)
        warmup = 3 if overrides["num_workers"] == 0 else 8  # workers start up first
        result[f"train_examples_per_s_{name}"] = round(
            _rate(iterator, args.batches, size, warmup), 1
        )
        if hasattr(iterator, "close"):
            iterator.close()

    start = time.perf_counter()
    examples = sum(
        int(b["weight"].sum())
        for b in pipeline.make_batches(config, "validation", train=False, item_store=store)
    )
    result["eval_examples_per_s"] = round(examples / (time.perf_counter() - start), 1)

    rate, compile_s = _train_rate(config, store, args.steps)
    result["model_train_examples_per_s"] = round(rate, 1)
    result["model_compile_s"] = round(compile_s, 1)
    result["pipeline_over_model"] = round(
        result["train_examples_per_s_inline"] / result["model_train_examples_per_s"], 1
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
