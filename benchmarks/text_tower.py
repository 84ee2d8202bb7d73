"""Text tower speed: cache building (texts/s) and one fine-tuning step, for MiniLM.

    timeout 600 .venv/bin/python benchmarks/text_tower.py

Cache building is `text_embeddings` end to end into an empty cache folder (model load,
tokenization, compilation, BERT over every text, write), and its steady-state rate
(BERT alone, compiled). The fine-tuning step is one jitted forward + backward + Adam
update of BERT and the projection on a dummy loss, batch 32, in `finetune` mode and in
`finetune_top_n` (top 2 of 6 layers). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmrec_jax.data.text_cache import text_embeddings, tokenize_texts
from mmrec_jax.models.bert_weights import load_pretrained
from mmrec_jax.models.text import TextTower, pool

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LENGTHS = (32, 128)
BATCH = 32
NUM_TEXTS = 512
STEPS = 5


def _texts(num: int, seed: int = 0) -> list[str]:
    """Sentences long enough to fill 128 tokens."""
    words = (
        "the a cat dog video music song rain night city walk quiet long home through "
        "bright morning coffee guitar piano dance movie review funny sad story about"
    ).split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 140)))) for _ in range(num)]


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which blocks on its result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_cache(max_len: int, bert, params, tokenizer) -> dict:
    texts = _texts(NUM_TEXTS)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        text_embeddings(texts, MODEL, "mean", max_len, cache_dir, batch_size=64)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        text_embeddings(texts, MODEL, "mean", max_len, cache_dir, batch_size=64)
        reload = time.perf_counter() - start
    ids, mask = tokenize_texts(tokenizer, texts[:64], max_len)

    @jax.jit
    def embed(params, ids, mask):
        hidden, pooled = bert.apply({"params": params}, ids, mask)
        return pool(hidden, mask, pooled, "mean")

    embed(params, ids, mask).block_until_ready()
    batch_s = _timed(lambda: embed(params, ids, mask).block_until_ready(), 3)
    return {
        "cache_build_texts_per_s": round(NUM_TEXTS / cold, 1),
        "bert_steady_texts_per_s": round(64 / batch_s, 1),
        "cache_reload_s": round(reload, 3),
    }


def bench_step(max_len: int, bert, params, tokenizer, mode: str) -> dict:
    text_config = ml_collections.ConfigDict(
        {"model": MODEL, "mode": mode, "top_n": 2, "pooling": "mean"}
    )
    tower = TextTower(text_config, width=128, bert_config=bert.config)
    ids, mask = tokenize_texts(tokenizer, _texts(BATCH, seed=1), max_len)
    items = {"text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
    variables = tower.init(jax.random.key(0), items)
    variables["params"]["bert"] = params
    optimizer = optax.adam(1e-4)
    state = (variables["params"], optimizer.init(variables["params"]))
    target = jax.random.normal(jax.random.key(1), (BATCH, 128))

    @jax.jit
    def step(state, items, rng):
        tower_params, opt_state = state

        def loss_fn(p):
            out = tower.apply({"params": p}, items, train=True, rngs={"dropout": rng})
            return jnp.mean((out - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(tower_params)
        updates, opt_state = optimizer.update(grads, opt_state, tower_params)
        return (optax.apply_updates(tower_params, updates), opt_state), loss

    rng = jax.random.key(2)
    start = time.perf_counter()
    compiled = step.lower(state, items, rng).compile()
    compile_s = time.perf_counter() - start
    state, loss = compiled(state, items, rng)
    loss.block_until_ready()

    def run():
        nonlocal state
        state, loss = compiled(state, items, rng)
        loss.block_until_ready()

    return {"step_ms": round(1e3 * _timed(run, STEPS), 1), "compile_s": round(compile_s, 1)}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    bert, params, tokenizer = load_pretrained(MODEL)
    result = {
        "benchmark": "text_tower",
        "model": MODEL,
        "batch": BATCH,
        "num_texts": NUM_TEXTS,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    for max_len in LENGTHS:
        result[f"cache_L{max_len}"] = bench_cache(max_len, bert, params, tokenizer)
        for mode in ("finetune", "finetune_top_n"):
            result[f"{mode}_L{max_len}"] = bench_step(max_len, bert, params, tokenizer, mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
