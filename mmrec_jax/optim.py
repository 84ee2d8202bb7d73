"""The optimizer: AdamW with warmup and cosine decay, clipping, per-tower rates, accumulation.

Parameters are labelled by their top-level module (the tower: text, image, audio, ...).
Each label gets AdamW with the shared schedule times its `train.tower_lr_scale` (a
scale named for a tower that the model has switched off is ignored);
frozen parameters get `optax.set_to_zero()` (no update, no weight decay, no moments).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import ml_collections
import optax

from mmrec_jax import schema

FROZEN = "frozen"


def unknown_scale_names(text: str, known: set[str]) -> str | None:
    """What is wrong when `train.tower_lr_scale` (`text`) names something not in `known`
    (towers and top-level parameter groups); None when it names only those."""
    unknown = sorted(set(parse_lr_scales(text)) - known)
    if not unknown:
        return None
    return (
        f"config.train.tower_lr_scale={text!r} names {unknown}, which are no towers; "
        f"known: {', '.join(sorted(known - {FROZEN}))}."
    )


def parse_lr_scales(text: str) -> dict[str, float]:
    """Parses `train.tower_lr_scale`, e.g. "text=0.1,image=2" -> {"text": 0.1, "image": 2.0}."""
    scales = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            if not sep:
                raise ValueError(part)
            scales[name] = float(value)
        except ValueError as error:
            raise ValueError(
                f"config.train.tower_lr_scale={text!r}: {part!r} is not NAME=NUMBER, "
                'e.g. "text=0.1,image=1.0".'
            ) from error
        if not math.isfinite(scales[name]) or scales[name] < 0:
            raise ValueError(
                f"config.train.tower_lr_scale={text!r}: the scale of {name!r} must "
                "be a finite number >= 0 (0 freezes that tower)."
            )
    return scales


def learning_rate_schedule(train_config: ml_collections.ConfigDict, total_steps: int):
    """Linear warmup from 0 to the peak rate, then cosine decay to 0 at `total_steps`."""
    peak = train_config.learning_rate
    warmup = min(train_config.warmup_steps, max(total_steps - 1, 0))
    if warmup == 0 and total_steps <= 1:
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def param_labels(
    params: Mapping, is_frozen: Callable[[tuple[str, ...]], bool] | None = None
) -> dict:
    """Labels each parameter by its top-level module name, or FROZEN."""

    def label(path, _leaf) -> str:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if is_frozen is not None and is_frozen(keys):
            return FROZEN
        return keys[0]

    return jax.tree_util.tree_map_with_path(label, dict(params))


def build_optimizer(
    train_config: ml_collections.ConfigDict,
    params: Mapping,
    total_steps: int,
    is_frozen: Callable[[tuple[str, ...]], bool] | None = None,
    param_towers: Mapping[str, str] | None = None,
) -> tuple[optax.GradientTransformation, Callable]:
    """Builds the optimizer for `params`.

    Args:
      train_config: `config.train` (learning_rate, warmup_steps, weight_decay,
        grad_clip_norm, grad_accum_steps, tower_lr_scale).
      params: the parameter tree (only its structure is used).
      total_steps: optimizer updates in the run (the cosine's length).
      is_frozen: path -> True for parameters that must never change.
      param_towers: top-level parameter name -> tower name, so that a scale given for a
        tower (e.g. "id") applies to all its parameter groups (e.g. item_id, user_id).

    Returns:
      (optimizer, schedule): with `grad_accum_steps > 1` the optimizer is wrapped in
      `optax.MultiSteps`, which applies one update every that many calls.
    """
    schedule = learning_rate_schedule(train_config, total_steps)
    labels = param_labels(params, is_frozen)
    scales = parse_lr_scales(train_config.tower_lr_scale)
    param_towers = dict(param_towers or {})
    names = sorted({leaf for leaf in jax.tree.leaves(labels)})
    known = set(names) | set(param_towers) | set(param_towers.values()) | set(schema.TOWERS)
    problem = unknown_scale_names(train_config.tower_lr_scale, known)
    if problem is not None:
        raise ValueError(problem)
    transforms = {}
    for name in names:
        if name == FROZEN:
            transforms[name] = optax.set_to_zero()
            continue
        scale = scales.get(name, scales.get(param_towers.get(name, name), 1.0))
        transforms[name] = optax.adamw(
            lambda step, scale=scale: schedule(step) * scale,
            weight_decay=train_config.weight_decay,
        )
    chain = []
    if train_config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    optimizer = optax.chain(*chain)
    if train_config.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=train_config.grad_accum_steps)
    return optimizer, schedule
