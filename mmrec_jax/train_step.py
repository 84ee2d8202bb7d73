"""The train state and the train step, apart from the data that feeds them.

`build_train_state` creates the parameters and optimizer state already sharded on a mesh
(a trained text tower gets its pretrained BERT), `make_train_step` is the pure step
`(state, batch) -> (state, metrics)`, and `jit_train_step` jits it as the training loop
(`mmrec_jax.train`) runs it. Nothing here reads a dataset: research code and the
benchmarks feed these their own batches (`mmrec_jax.schema` gives the shapes) without
the input pipeline's packages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmrec_jax import optim, runtime, schema, sharding
from mmrec_jax.config import ConfigError
from mmrec_jax.models import recommender


def runs_inline(config: ml_collections.ConfigDict) -> bool:
    """Whether a run's CPU computations should run on the thread that launches them.

    True when the run fine-tunes its text model: its train step's temporaries (372 MiB
    for MiniLM at 32 tokens and batch 32, 1244 MiB at 128) dwarf the host's work between
    steps, and kept in the main heap they are not faulted in again on every step
    (`runtime.run_cpu_computations_inline`; on the 2-core CPU machine the step 1-10%
    faster at 32 tokens, 10-17% at 128). The other configs keep JAX's asynchronous
    dispatch: the embedded default's run was 3.5% slower inline (BENCHMARKS.md).
    """
    return "text" in schema.parse_towers(config.model.towers) and (
        config.model.text.mode == "finetune"
    )


def set_up_cpu_host(
    config: ml_collections.ConfigDict, tune_allocator: bool = True, inline: bool = True
) -> tuple[bool, bool]:
    """Applies the host settings a run of `config` steps fastest with on a CPU.

    glibc keeps freed memory (`runtime.tune_host_allocator`), and the runs that
    `runs_inline` picks run each computation on the launching thread
    (`runtime.run_cpu_computations_inline`). Call it first thing in a process, before its
    first JAX computation.

    Args:
      config: the run config.
      tune_allocator: False keeps glibc's default allocator settings.
      inline: False keeps JAX's asynchronous dispatch for every run.

    Returns:
      (allocator tuned, computations inline): what took effect.
    """
    tuned = tune_allocator and runtime.tune_host_allocator()
    inlined = inline and runs_inline(config) and runtime.run_cpu_computations_inline()
    return bool(tuned), bool(inlined)


def _bce_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean binary cross-entropy with logits; padding rows have weight 0."""
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(model: Any, optimizer: optax.GradientTransformation):
    """The pure train step: `(state, batch) -> (state, metrics)`."""

    def train_step(state, batch):
        dropout_rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, batch, train=True, rngs={"dropout": dropout_rng}
            )
            return _bce_loss(logits, batch["label"], batch["weight"])

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        # The barrier keeps XLA from sharing g**2 between this metric and Adam's second
        # moment, which materialised it for every large weight (3-7% of a CPU step).
        metric_grads = jax.lax.optimization_barrier(grads)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(metric_grads)))
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    return train_step


def _text_is_frozen_fn(config: ml_collections.ConfigDict):
    """path -> frozen? for the optimizer, from the text tower's rules."""
    if "text" not in schema.parse_towers(config.model.towers):
        return None
    if config.model.text.mode != "finetune_top_n":
        return None
    from mmrec_jax.models.bert import load_bert_config
    from mmrec_jax.models.text import frozen_text_param

    num_layers = load_bert_config(config.model.text.model).num_hidden_layers

    def is_frozen(path: tuple[str, ...]) -> bool:
        if len(path) < 2 or path[0] != "text" or path[1] != "bert":
            return False
        return frozen_text_param(path[2:], config.model.text, num_layers)

    return is_frozen


def _create_params(
    init_params: Any,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    key: jax.Array,
    example_batch: dict,
) -> tuple[dict, dict]:
    """Initialises the parameters already sharded: (params, their shardings).

    A trained text tower's BERT comes from its pretrained weights instead: the jitted
    init leaves it out, so XLA neither compiles nor runs a random initialisation that
    would be thrown away (for BERT-base, 4.4 of the 7.3 s that init compiles in on a
    CPU). Every other parameter gets the values `model.init` gives it.
    """
    abstract = jax.eval_shape(init_params, key, example_batch)
    shardings = sharding.state_shardings(mesh, abstract, config.train.fsdp)
    bert = recommender.pretrained_text_params(abstract, config.model)
    if bert is None:
        return jax.jit(init_params, out_shardings=shardings)(key, example_batch), shardings

    def without_bert(tree: dict) -> dict:
        return {**tree, "text": {k: v for k, v in tree["text"].items() if k != "bert"}}

    params = jax.jit(
        lambda key, batch: without_bert(init_params(key, batch)),
        out_shardings=without_bert(shardings),
    )(key, example_batch)
    text = {**params["text"], "bert": sharding.put_global(bert, shardings["text"]["bert"])}
    return {**params, "text": text}, shardings


@dataclasses.dataclass
class TrainSetup:
    """A train state on the mesh with what created it."""

    state: dict  # {"params", "opt_state", "step", "rng"}
    shardings: dict  # the same tree of NamedShardings
    optimizer: optax.GradientTransformation
    schedule: Any


def jit_train_step(
    model: Any, setup: TrainSetup, mesh: jax.sharding.Mesh, local_batch: dict, compute_dtype: str
):
    """`make_train_step` jitted as training runs it: `(state, batch) -> (state, metrics)`.

    The state's rng is raw key data, as the train state holds it; the state is donated
    and keeps `setup.shardings`, the batch takes the shardings of `local_batch`'s global
    batch, the metrics are replicated. Each call traces a new function, so programs
    compiled under different settings stay apart.
    """
    step_fn = make_train_step(model, setup.optimizer)

    def train_step(state, batch):
        state = dict(state, rng=jax.random.wrap_key_data(state["rng"]))
        new_state, step_metrics = step_fn(state, batch)
        return dict(new_state, rng=jax.random.key_data(new_state["rng"])), step_metrics

    return jax.jit(
        train_step,
        in_shardings=(setup.shardings, sharding.batch_shardings(mesh, local_batch)),
        out_shardings=(setup.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=runtime.compiler_options(compute_dtype),
    )


def build_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    mesh: jax.sharding.Mesh,
    example_batch: dict,
    total_updates: int,
    abstract: bool = False,
) -> TrainSetup:
    """Creates the train state already sharded (or only its shapes, with `abstract`).

    Parameters are initialised under `jax.jit(..., out_shardings=...)` so each device
    creates only its own shards; a trained text tower's BERT is placed from its
    pretrained weights instead of being initialised.

    Args:
      config: the resolved run config.
      model: `recommender.build_model(config.model)`.
      mesh: the device mesh.
      example_batch: a global batch (its shapes fix the parameter shapes).
      total_updates: optimizer updates in the run (the schedule's length).
      abstract: return `jax.ShapeDtypeStruct`s with shardings instead of arrays (for
        restoring a checkpoint without computing an initialisation).

    Raises:
      ConfigError: the model's FFT would hang on this mesh (`check_no_fft_deadlock`).
    """
    check_no_fft_deadlock(config, mesh)
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)

    def init_params(key, batch):
        return model.init({"params": key, "dropout": key}, batch, train=False)["params"]

    fsdp = config.train.fsdp
    replicated = sharding.replicated(mesh)
    if abstract:
        params = jax.eval_shape(init_params, init_rng, example_batch)
        param_shardings = sharding.state_shardings(mesh, params, fsdp)
    else:
        params, param_shardings = _create_params(init_params, config, mesh, init_rng, example_batch)
    optimizer, schedule = optim.build_optimizer(
        config.train,
        params,
        total_updates,
        _text_is_frozen_fn(config),
        recommender.PARAM_TOWERS,
    )
    if abstract:
        opt_state = jax.eval_shape(optimizer.init, params)
        opt_shardings = sharding.state_shardings(mesh, opt_state, fsdp)
    else:
        opt_state, opt_shardings = sharding.create_sharded(optimizer.init, mesh, fsdp, params)
    shardings = {
        "params": param_shardings,
        "opt_state": opt_shardings,
        "step": replicated,
        "rng": replicated,
    }
    counters = {
        "step": np.zeros((), np.int32),
        "rng": np.asarray(jax.random.key_data(dropout_rng)),
    }
    if abstract:
        state = {"params": params, "opt_state": opt_state, **counters}
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
    else:
        counters = sharding.put_replicated(mesh, counters)
        state = {"params": params, "opt_state": opt_state, **counters}
    return TrainSetup(state, shardings, optimizer, schedule)


def check_no_fft_deadlock(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises ConfigError where the log-mel audio frontend's FFT would hang this process
    (`runtime.fft_can_deadlock`: jaxlib 0.11 on several CPU devices), naming the fixes."""
    towers = schema.parse_towers(config.model.towers)
    if "audio" not in towers or config.model.audio.frontend != "logmel":
        return
    if not runtime.fft_can_deadlock(len(mesh.local_devices)):
        return
    import jaxlib.version

    raise ConfigError(
        f"config.model.audio.frontend='logmel' computes an FFT, and jaxlib "
        f"{jaxlib.version.__version__}'s CPU FFT hangs for good when several CPU devices "
        f"({len(mesh.local_devices)} here) run it at once. Add "
        f"{runtime.SINGLE_THREADED_EIGEN_FLAG} to XLA_FLAGS before the start (slower: one "
        "thread per operation), run on one CPU device, use jax 0.10 or 0.12 or newer, or "
        "set --config.model.audio.frontend=raw."
    )


def check_batch_divides(batch: int, num_devices: int, kept_batch: int | None = None) -> None:
    """Raises ConfigError unless `batch` rows split evenly over `num_devices`.

    The message names the nearest batch sizes that do; with `kept_batch`, the batch size
    of a run to resume (which cannot change), also how to resume it instead.
    """
    if batch % num_devices == 0:
        return
    below = batch // num_devices * num_devices
    sizes = " or ".join(str(b) for b in (below, below + num_devices) if b > 0)
    fix = f"use {sizes}"
    if kept_batch is not None:
        counts = ", ".join(str(n) for n in range(1, kept_batch + 1) if kept_batch % n == 0)
        fix = (
            f"to start a new run in another --workdir, use {sizes}; to resume this "
            f"one, keep its batch size {kept_batch} and run on a number of devices that "
            f"divides it ({counts})"
        )
    raise ConfigError(
        f"config.train.batch_size={batch} must be divisible by the number of devices "
        f"({num_devices}), which each take an equal part: {fix}."
    )
