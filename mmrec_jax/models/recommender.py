"""The recommender: the one place where the towers meet.

    model = build_model(config.model)
    variables = model.init(rng, batch)                   # batch: see mmrec_jax.schema
    variables = {"params": with_pretrained_text(variables["params"], config.model)}
    logits = model.apply(variables, batch, train=False)  # (B,)
    encoded = model.apply(variables, items, method=model.encode_items)
    logits = model.apply(variables, rows, encoded, method=model.score)
    grid = model.apply(variables, users, encoded, method=model.score_grid)  # (U, N)

Item towers (text, image, audio, item ID) run once per item of the batch's item block
and give M item tokens per item; `score` gathers them for each row's candidate by slot,
adds the user tokens (user ID, attention over the history items' embeddings) and fuses
them into one logit. A user or item ID token whose ID is out of vocabulary (index 0: a
user or item no training row has) is marked absent, like a missing modality: the OOV row
of an ID table is never trained, so the fusion reads the other tokens, as it learned to
under modality dropout. Splitting `encode_items` from `score` lets full-catalogue ranking
encode every item once and then score users x items (`score_grid`: each user's tokens
and history attention computed once per user, not per item). `init` gives every layer random
weights; `with_pretrained_text` puts the pretrained BERT into a text tower that
fine-tunes it (a frozen one reads cached embeddings and holds no BERT).

Parameters sit under one top-level name per part: `text` (its BERT at
`params["text"]["bert"]`), `image`, `audio`, `item_id`, `user_id`, `history`, `fusion`;
`PARAM_TOWERS` maps them to the tower names of `config.model.towers`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmrec_jax import runtime, schema
from mmrec_jax.config import check_model_config
from mmrec_jax.models.audio import AudioTower
from mmrec_jax.models.bert import Bert, BertConfig, load_bert_config
from mmrec_jax.models.fusion import Fusion
from mmrec_jax.models.image import ImageTower
from mmrec_jax.models.layers import check_has_params, masked_mean
from mmrec_jax.models.text import TextTower, check_text_config
from mmrec_jax.models.user import HistoryAttention, IdEmbedding

# Item-modality tokens in their order in the fusion: (tower, token name).
ITEM_TOKENS = (("text", "text"), ("image", "image"), ("audio", "audio"), ("id", "item_id"))
# User tokens after the item tokens: (tower, token name).
USER_TOKENS = (("id", "user_id"), ("history", "history"))
# Top-level parameter name -> the tower it belongs to (fusion is shared by all).
PARAM_TOWERS = {
    "text": "text",
    "image": "image",
    "audio": "audio",
    "item_id": "id",
    "user_id": "id",
    "history": "history",
    "fusion": "fusion",
}


def token_names(towers: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(item token names, user token names) of a tower set, in fusion order."""
    items = tuple(name for tower, name in ITEM_TOKENS if tower in towers)
    users = tuple(name for tower, name in USER_TOKENS if tower in towers)
    return items, users


class Recommender(nn.Module):
    """Scores (user, item) rows with the towers enabled in `config.towers`.

    Attributes:
      config: `config.model` (towers, width, dtype, param_dtype, num_users, num_items,
        text, image, audio, user, fusion).
      bert_config: the text tower's BERT architecture; required when the text tower
        runs BERT (mode finetune or finetune_top_n), see `build_model`.
    """

    config: ml_collections.ConfigDict
    bert_config: BertConfig | None = None

    @property
    def towers(self) -> tuple[str, ...]:
        """The enabled towers, parsed from `config.towers`."""
        return schema.parse_towers(self.config.towers)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The compute dtype, `config.dtype` with "auto" resolved for this platform."""
        return jnp.dtype(runtime.compute_dtype(self.config.dtype))

    def setup(self):
        cfg = self.config
        towers = self.towers
        item_tokens, _ = token_names(towers)
        if not item_tokens:
            raise ValueError(
                f"config.model.towers={cfg.towers!r} has no item tower; add at least one of "
                "text, image, audio or id (history needs item embeddings to attend over)."
            )
        if "id" in towers:
            for key in ("num_users", "num_items"):
                if cfg[key] < 1:
                    raise ValueError(
                        f"config.model.{key}={cfg[key]} but the id tower needs the vocabulary "
                        "size; the training code fills it from the dataset, or set it."
                    )
        kw = dict(dtype=self.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        if "text" in towers:
            self.text = TextTower(cfg.text, cfg.width, self.bert_config, **kw)
        if "image" in towers:
            self.image = ImageTower(cfg.image, cfg.width, **kw)
        if "audio" in towers:
            self.audio = AudioTower(cfg.audio, cfg.width, **kw)
        if "id" in towers:
            self.item_id = IdEmbedding(cfg.num_items, cfg.width, **kw)
            self.user_id = IdEmbedding(cfg.num_users, cfg.width, **kw)
        if "history" in towers:
            self.history = HistoryAttention(cfg.user.num_heads, **kw)
        self.fusion = Fusion(cfg.fusion, len(item_tokens), **kw)

    def _expected_dims(self) -> dict[str, int]:
        dims = {}
        if "image" in self.towers:
            dims["S"] = self.config.image.size
        if "audio" in self.towers:
            dims["T"] = self.config.audio.clip_samples
        return dims

    def encode_items(self, items: Mapping, train: bool = False) -> dict[str, jax.Array]:
        """Runs each enabled item tower once over an item block.

        Args:
          items: the item block (`batch["items"]`, see `mmrec_jax.schema`), U >= 1 items.
            Applied eagerly, a NaN or infinite value in the content of an item that has
            that modality raises `BatchError`, and an `item_id` outside [0, num_items]
            (counted as out of vocabulary, like 0) warns. An out-of-vocabulary item's ID
            token is absent from the mask.
          train: enables dropout inside the towers (rng stream "dropout").

        Returns:
          {"tokens": (U, M, D) item-modality tokens (zeros where absent),
           "mask": (U, M) bool, True where the item has that modality,
           "embedding": (U, D) masked mean of the tokens, the item's summary vector}.
        """
        train = _static_train(train)
        check_has_params(self)
        schema.validate_items(
            items,
            self.towers,
            self.config.text.mode,
            expected_dims=self._expected_dims(),
            for_model=True,
        )
        schema.check_finite_content(items)
        if "id" in self.towers:
            schema.warn_outside_vocabulary(
                "item_id", items["item_id"], self.config.num_items, "num_items"
            )
        items = _zero_absent_content(items)
        tokens, masks = [], []
        for name in token_names(self.towers)[0]:
            if name == "text":
                tokens.append(self.text(items, train))
                masks.append(items["has_text"])
            elif name == "image":
                tokens.append(self.image(items["image"], items["has_image"]))
                masks.append(items["has_image"])
            elif name == "audio":
                tokens.append(self.audio(items["audio"], items["has_audio"]))
                masks.append(items["has_audio"])
            else:
                tokens.append(self.item_id(items["item_id"]))
                masks.append(_in_vocabulary(items["item_id"], self.config.num_items))
        dtype = self.compute_dtype
        mask = jnp.stack([jnp.asarray(m, bool) for m in masks], axis=1)  # (U, M)
        stacked = jnp.stack([t.astype(dtype) for t in tokens], axis=1)  # (U, M, D)
        stacked = jnp.where(mask[..., None], stacked, 0)
        return {"tokens": stacked, "mask": mask, "embedding": masked_mean(stacked, mask, 1)}

    def score(self, rows: Mapping, encoded: Mapping, train: bool = False) -> jax.Array:
        """Scores rows against an encoded item block.

        Args:
          rows: `item_slot` (B,), with the id tower `user_id` (B,) and with the history
            tower `history_slot` (B, H) and `history_mask` (B, H); slots index the item
            block (a history slot where the mask is False may hold anything). A slot
            outside the block raises `BatchError` when applied eagerly; under jit, where
            values cannot be checked, its row's logit is NaN. A `user_id` outside
            [0, num_users] counts as out of vocabulary, like 0 (eagerly, with a warning);
            an out-of-vocabulary user's ID token is absent. A row none of whose tokens is
            present (an unknown user and item with nothing else to read) scores the
            fusion's bias alone.
          encoded: the output of `encode_items` for that item block, or tables of its
            form: `tokens` (N, M, D), `mask` (N, M) bool and `embedding` (N, D), M the
            model's item tokens and D its width.
          train: enables dropout and modality dropout (rng stream "dropout").

        Returns:
          (B,) float32 logits.
        """
        train = _static_train(train)
        check_has_params(self)
        schema.validate_score_rows(rows, self.towers)
        num_items = schema.validate_encoded(
            encoded, len(token_names(self.towers)[0]), self.config.width
        )
        _check_slots("Batch field 'item_slot'", rows["item_slot"], num_items)
        self._check_user_fields(rows, num_items)
        slot = rows["item_slot"]  # (B,)
        tokens = [encoded["tokens"][slot]]  # [(B, M, D)]
        masks = [encoded["mask"][slot]]  # [(B, M)]
        # Compiled code cannot reject a slot outside the block (indexing clamps it and
        # wraps a negative one): such a row's logit is NaN, not another item's score.
        bad_slot = ~_in_range(slot, num_items)  # (B,)
        if "id" in self.towers:
            tokens.append(self.user_id(rows["user_id"])[:, None, :])  # (B, 1, D)
            masks.append(_in_vocabulary(rows["user_id"], self.config.num_users)[:, None])
        if "history" in self.towers:
            candidate = encoded["embedding"][slot]  # (B, D)
            history_mask = jnp.asarray(rows["history_mask"], bool)  # (B, H)
            history = encoded["embedding"][rows["history_slot"]]  # (B, H, D)
            token, present = self.history(candidate, history, history_mask)
            tokens.append(token[:, None, :])  # (B, 1, D)
            masks.append(present[:, None])
            bad_slot |= _history_out_of_range(rows, num_items)
        dtype = self.compute_dtype
        tokens = jnp.concatenate([t.astype(dtype) for t in tokens], axis=1)  # (B, T, D)
        mask = jnp.concatenate(masks, axis=1)  # (B, T)
        logits = self.fusion(tokens, mask, train)  # (B,)
        return jnp.where(bad_slot, jnp.nan, logits)

    def _check_user_fields(self, rows: Mapping, num_items: int) -> None:
        """Applied eagerly: a history slot outside the N encoded items raises
        `BatchError`, a `user_id` outside the vocabulary warns."""
        if "history" in self.towers:
            _check_slots(
                "Batch field 'history_slot'",
                rows["history_slot"],
                num_items,
                where=rows["history_mask"],
            )
        if "id" in self.towers:
            schema.warn_outside_vocabulary(
                "user_id", rows["user_id"], self.config.num_users, "num_users"
            )

    def score_grid(
        self, users: Mapping, encoded: Mapping, item_slots: jax.Array | None = None
    ) -> jax.Array:
        """Scores every user against every encoded item (full-catalogue ranking).

        The logits `score` gives (without dropout) for the rows that pair each user with
        each item, computed without repeating the users per item: each user's tokens
        and history are read, normalised and projected once and each item's tokens
        once; only the fusion runs per (user, item) pair.

        Args:
          users: U users as `score`'s rows without `item_slot`: `user_id` (U,) with the
            id tower, `history_slot` (U, H) and `history_mask` (U, H) with the history
            tower. A history slot outside the block raises `BatchError` when applied
            eagerly; under jit that user's logits are NaN.
          encoded: the output of `encode_items` for N items, or tables of its form (as
            for `score`).
          item_slots: (C,) slots of `encoded` to score, in that order (the history slots
            index all of it); None scores all N. A slot outside the block raises
            `BatchError` eagerly; under jit its column is NaN.

        Returns:
          (U, N) float32 logits; (U, C) with `item_slots`.
        """
        check_has_params(self)
        schema.validate_score_users(users, self.towers)
        item_tokens = token_names(self.towers)[0]
        num_items = schema.validate_encoded(encoded, len(item_tokens), self.config.width)
        user_fields = [name for name in ("user_id", "history_slot") if name in users]
        if not user_fields:
            raise schema.BatchError(
                "score_grid needs the users' 'user_id' (U,) to know how many users there "
                "are, even for towers that do not read it."
            )
        num_users = jnp.shape(users[user_fields[0]])[0]
        candidates = {key: encoded[key] for key in ("tokens", "mask", "embedding")}
        bad_item = jnp.zeros((num_items,), bool)
        if item_slots is not None:
            _check_slots("item_slots", item_slots, num_items)
            candidates = {key: value[item_slots] for key, value in candidates.items()}
            bad_item = ~_in_range(item_slots, num_items)  # (C,)
        self._check_user_fields(users, num_items)
        dtype = self.compute_dtype
        width = self.config.width
        grid = (num_users, bad_item.shape[0])  # (U, N or C)
        tokens = [
            jnp.broadcast_to(candidates["tokens"].astype(dtype), (*grid, len(item_tokens), width))
        ]
        masks = [jnp.broadcast_to(jnp.asarray(candidates["mask"], bool), (*grid, len(item_tokens)))]
        bad_user = jnp.zeros((num_users,), bool)
        if "id" in self.towers:
            token = self.user_id(users["user_id"]).astype(dtype)  # (U, D)
            present = _in_vocabulary(users["user_id"], self.config.num_users)  # (U,)
            tokens.append(jnp.broadcast_to(token[:, None, None, :], (*grid, 1, width)))
            masks.append(jnp.broadcast_to(present[:, None, None], (*grid, 1)))
        if "history" in self.towers:
            history_mask = jnp.asarray(users["history_mask"], bool)  # (U, H)
            history = encoded["embedding"][users["history_slot"]]  # (U, H, D)
            token, present = self.history(candidates["embedding"], history, history_mask, grid=True)
            tokens.append(token.astype(dtype)[:, :, None, :])  # (U, N, 1, D)
            masks.append(jnp.broadcast_to(present[:, None, None], (*grid, 1)))
            bad_user |= _history_out_of_range(users, num_items)
        tokens = jnp.concatenate(tokens, axis=2)  # (U, N, T, D)
        mask = jnp.concatenate(masks, axis=2)  # (U, N, T)
        num_tokens = tokens.shape[2]
        logits = self.fusion(
            tokens.reshape(-1, num_tokens, width), mask.reshape(-1, num_tokens), False
        ).reshape(grid)  # (U, N)
        return jnp.where(bad_user[:, None] | bad_item[None, :], jnp.nan, logits)

    def __call__(self, batch: Mapping, train: bool = False) -> jax.Array:
        """Scores a batch: `score(batch, encode_items(batch["items"]))`.

        Args:
          batch: a batch of `mmrec_jax.schema`: the rows `score` reads plus the "items"
            block (`label`, `weight`, `user_index` and `items["item_index"]` are for the
            loss and the metrics, and may be absent).
          train: enables dropout and modality dropout (rng stream "dropout").

        Returns:
          (B,) float32 logits.
        """
        if "items" not in batch:
            raise schema.BatchError("Batch is missing the required 'items' dict (the item block).")
        return self.score(batch, self.encode_items(batch["items"], train), train)


def _zero_absent_content(items: Mapping) -> dict:
    """`items` with the float content of absent modalities set to zero.

    The towers run on every item and their outputs for absent modalities are masked
    out, but a NaN or inf input would still reach the parameters' gradients through the
    towers' backward pass (0 * NaN). Zeroing it first keeps such input harmless.
    """
    items = dict(items)
    for field, flag in schema.FLOAT_CONTENT:
        if field in items:
            has = jnp.asarray(items[flag], bool)  # (U,)
            content = items[field]  # (U, ...)
            items[field] = jnp.where(has.reshape(has.shape + (1,) * (content.ndim - 1)), content, 0)
    return items


def _static_train(train) -> bool:
    """`train` as a Python bool; a traced one (jit without `static_argnames`) is refused."""
    try:
        return bool(train)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(
            "train is traced: under jax.jit it must be a static Python bool, as it changes "
            "the computation (dropout). Jit with jax.jit(model.apply, "
            "static_argnames='train')."
        ) from None


def _in_vocabulary(ids: jax.Array, num_ids: int) -> jax.Array:
    """Whether each ID-vocabulary index names a known ID (0 and out-of-range ones do not)."""
    ids = jnp.asarray(ids)
    return (ids >= 1) & (ids <= num_ids)


def _check_slots(name: str, slots, num_items: int, where=None) -> None:
    """`schema.check_index_range` of slots into an encoded block of `num_items` items."""
    schema.check_index_range(
        name,
        slots,
        num_items,
        f"slots index the {num_items} items of the encoded item block.",
        where=where,
    )


def _history_out_of_range(rows: Mapping, num_items: int) -> jax.Array:
    """(B,) bool: the row's history holds a real entry whose slot is outside the block."""
    history_mask = jnp.asarray(rows["history_mask"], bool)  # (B, H)
    return jnp.any(history_mask & ~_in_range(rows["history_slot"], num_items), axis=1)


def _in_range(slots: jax.Array, num_items: int) -> jax.Array:
    """Whether each slot indexes one of the block's `num_items` items."""
    slots = jnp.asarray(slots)
    return (slots >= 0) & (slots < num_items)


def build_model(model_config: ml_collections.ConfigDict | Mapping) -> Recommender:
    """Builds the recommender for `config.model`.

    Reads the BERT architecture (`config.json` only, no weights) when the text tower
    runs BERT. `num_users` / `num_items` must be set when the id tower is enabled.

    Raises:
      ConfigError: a field of `model_config` is missing, unknown (misspelt) or holds a
        value the model cannot use (`config.check_model_config`).
    """
    if not isinstance(model_config, ml_collections.ConfigDict):
        model_config = ml_collections.ConfigDict(model_config)
    check_model_config(model_config)
    bert_config = None
    if schema.bert_in_step(model_config.towers, model_config.text.mode):
        bert_config = load_bert_config(model_config.text.model)
        check_text_config(model_config.text, bert_config)
    return Recommender(model_config, bert_config)


def pretrained_text_params(params: Mapping, model_config: ml_collections.ConfigDict) -> dict | None:
    """The pretrained weights of the text tower's BERT, for `params["text"]["bert"]`.

    Args:
      params: the model's parameter tree (`init(...)["params"]`), or only its shapes
        and dtypes (`jax.eval_shape` of it).
      model_config: `config.model`; its `text.model` names the pretrained BERT.

    Returns:
      The BERT's parameter tree as numpy arrays, each in the dtype of the parameter it
      replaces; None when `params` hold no BERT (no text tower, or text.mode frozen).
    """
    if "text" not in params or "bert" not in params["text"]:
        return None
    from mmrec_jax.hub import resolve_pretrained
    from mmrec_jax.models.bert_weights import load_params

    folder = resolve_pretrained(model_config.text.model)
    pretrained = load_params(Bert(load_bert_config(folder)), folder)
    current = params["text"]["bert"]
    if jax.tree.structure(current) != jax.tree.structure(pretrained):
        raise ValueError(
            f"The pretrained BERT {model_config.text.model!r} has another parameter tree than "
            "the text tower of these params: build the model and load the weights from the "
            "same config.model.text.model."
        )
    return jax.tree.map(lambda old, new: np.asarray(new, old.dtype), current, pretrained)


def with_pretrained_text(params: Mapping, model_config: ml_collections.ConfigDict) -> dict:
    """`params` with the text tower's random BERT replaced by its pretrained weights.

    `init` gives a trained text tower (text.mode finetune or finetune_top_n) a random
    BERT, as it gives every layer random weights; fine-tuning starts from the pretrained
    one of `model_config.text.model` after this. Without a BERT in `params` (frozen mode:
    the tower reads cached embeddings) they are returned as they are.

    Args:
      params: the model's parameter tree (`init(...)["params"]`).
      model_config: `config.model`, as given to `build_model`.
    """
    bert = pretrained_text_params(params, model_config)
    if bert is None:
        return dict(params)
    return {**params, "text": {**params["text"], "bert": jax.tree.map(jnp.asarray, bert)}}


def _params_of(variables: Mapping) -> Mapping:
    return variables["params"] if "params" in variables else variables


def count_params_by_tower(params: Mapping) -> dict[str, int]:
    """Parameter counts per tower.

    Args:
      params: the model's params (or variables holding "params").

    Returns:
      {tower: count} for the towers that have parameters ("id" sums the user and item
      ID tables; "fusion" is the shared fusion), in `PARAM_TOWERS` order, plus "total".
    """
    counts: dict[str, int] = {}
    for key, subtree in _params_of(params).items():
        tower = PARAM_TOWERS.get(key, key)
        size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(subtree))
        counts[tower] = counts.get(tower, 0) + size
    order = list(dict.fromkeys(PARAM_TOWERS.values()))
    result = {t: counts[t] for t in order if t in counts}
    result.update({t: n for t, n in counts.items() if t not in result})
    result["total"] = sum(counts.values())
    return result


def format_param_counts(params: Mapping) -> str:
    """`count_params_by_tower` as a small text table."""
    counts = count_params_by_tower(params)
    total = max(counts["total"], 1)
    lines = [f"{'tower':<10}{'params':>14}{'share':>8}"]
    for tower, count in counts.items():
        lines.append(f"{tower:<10}{count:>14,}{100.0 * count / total:>7.1f}%")
    return "\n".join(lines)


def print_param_counts(params: Mapping) -> None:
    """Prints `format_param_counts` (called at the start of training)."""
    print(format_param_counts(params), flush=True)
