"""The recommender's floating-point work, counted from its config and the batch shapes.

Counts the matrix multiplies and convolutions (2 FLOPs per multiply-add) of one forward
pass and of one training step, per part of the model. Elementwise work (activations,
LayerNorm, softmax, the optimizer update) and the log-mel FFT are not counted: on every
backend they are a small share of the time, and leaving them out makes the count the
usual "model FLOPs" that a matmul peak is compared against.

A training step is the forward pass plus, for every multiply `y = x @ w`, the gradient
of the trained operand (`w`: as many FLOPs as the forward) and the gradient of `x` when
anything below it is trained (again as many). So the first layer over raw data (the
first convolutions, the projection of cached text embeddings) costs 2x its forward, the
rest 3x, and BERT layers below `finetune_top_n`'s top N cost only their forward.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmrec_jax import schema
from mmrec_jax.models.bert import BertConfig
from mmrec_jax.models.layers import absorbed_attention_is_cheaper
from mmrec_jax.models.recommender import token_names


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The sizes that fix the work of one batch.

    Attributes:
      rows: B, scored (user, item) rows.
      items: U, items in the item block (each item tower runs once per item).
      text_len: L, tokens per text (trained text modes).
      history_len: H, history items per row (history tower).
      text_dim: Dt, width of the cached text embeddings (frozen text mode).
    """

    rows: int
    items: int
    text_len: int = 0
    history_len: int = 0
    text_dim: int = 0


@dataclasses.dataclass
class _Counter:
    """Accumulates forward and training FLOPs per part."""

    forward: dict[str, float] = dataclasses.field(default_factory=dict)
    train: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, part: str, flops: float, weight_grad: bool = True, input_grad: bool = True):
        """One multiply of `flops` forward FLOPs and the gradients a training step adds."""
        self.forward[part] = self.forward.get(part, 0.0) + flops
        factor = 1 + int(weight_grad) + int(input_grad)
        self.train[part] = self.train.get(part, 0.0) + factor * flops


def _bert(counter: _Counter, text: ml_collections.ConfigDict, bert: BertConfig, n: int, length):
    h, i = bert.hidden_size, bert.intermediate_size
    layers = bert.num_hidden_layers
    first_trained = layers - text.top_n if text.mode == "finetune_top_n" else 0
    # CLS and pooler pooling compute the last layer for the first token only.
    first_only = text.pooling in ("cls", "pooler")
    for layer in range(layers):
        trained = layer >= first_trained
        # The first layer's input is the embeddings (trained only in `finetune`).
        below = layer > first_trained or (layer == 0 and text.mode == "finetune")
        tokens = n * length
        queries = 1 if first_only and layer == layers - 1 else length
        dense = dict(weight_grad=trained, input_grad=trained and below)
        counter.add("text", 2 * n * queries * h * h, **dense)  # query
        counter.add("text", 2 * 2 * tokens * h * h, **dense)  # key, value
        # Scores and the weighted sum: both operands depend on the layer's weights.
        attention = dict(weight_grad=trained, input_grad=trained)
        counter.add("text", 2 * 2 * n * queries * length * h, **attention)
        inner = dict(weight_grad=trained, input_grad=trained)
        counter.add("text", 2 * n * queries * h * h, **inner)  # attention output
        counter.add("text", 2 * 2 * n * queries * h * i, **inner)  # feed-forward in and out
    if text.pooling == "pooler":
        counter.add("text", 2 * n * h * h, input_grad=first_trained < layers)


def _conv_tower(counter: _Counter, part: str, spatial: list[int], kernel: int, channels_in: int,
                channels: tuple[int, ...], hidden: int, width: int, n: int,
                input_trained: bool = False) -> None:  # fmt: skip
    for block, channels_out in enumerate(channels):
        positions = 1
        for size in spatial:
            positions *= size
        counter.add(
            part,
            2 * n * positions * kernel * channels_in * channels_out,
            input_grad=block > 0 or input_trained,
        )
        spatial = [size // 2 for size in spatial]
        channels_in = channels_out
    flat = channels_in
    for size in spatial:
        flat *= size
    counter.add(part, 2 * n * flat * hidden)
    counter.add(part, 2 * n * hidden * width)


def _attention(counter: _Counter, part: str, n: int, queries: int, keys: int, width: int,
               heads: int) -> None:  # fmt: skip
    """`layers.MultiHeadAttention` over n rows, in the form it picks for these sizes."""
    counter.add(part, 2 * n * queries * width * width)  # query
    if absorbed_attention_is_cheaper(queries, keys, width, heads):
        counter.add(part, 2 * n * queries * width * width)  # queries through the key kernel
        counter.add(part, 2 * 2 * n * queries * heads * keys * width)  # scores, weighted sum
        counter.add(part, 2 * n * queries * width * width)  # through the value kernel
    else:
        counter.add(part, 2 * 2 * n * keys * width * width)  # key, value
        counter.add(part, 2 * 2 * n * queries * keys * width)  # scores, weighted sum
    counter.add(part, 2 * n * queries * width * width)  # output


def count_flops(
    model_config: ml_collections.ConfigDict,
    shape: BatchShape,
    bert_config: BertConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Matmul and convolution FLOPs of one batch, forward and training step.

    Args:
      model_config: `config.model`.
      shape: the batch's sizes.
      bert_config: the text tower's BERT (required when the text tower runs BERT).

    Returns:
      {"forward": {part: FLOPs}, "train": {part: FLOPs}}, parts among text, image,
      audio, history, fusion, each with a "total".
    """
    towers = schema.parse_towers(model_config.towers)
    width = model_config.width
    counter = _Counter()
    u, b = shape.items, shape.rows
    if "text" in towers:
        text = model_config.text
        if schema.text_is_trained(text.mode):
            if bert_config is None:
                raise ValueError("count_flops needs bert_config when the text tower runs BERT.")
            _bert(counter, text, bert_config, u, shape.text_len)
            # BERT's output carries a gradient unless finetune_top_n trains no layer.
            bert_trained = text.mode == "finetune" or text.top_n > 0
            counter.add(
                "text", 2 * u * bert_config.hidden_size * width, input_grad=bert_trained
            )  # projection
        else:
            counter.add("text", 2 * u * shape.text_dim * width, input_grad=False)
    if "image" in towers:
        image = model_config.image
        _conv_tower(counter, "image", [image.size] * 2, 9, 3, tuple(image.channels),
                    image.hidden, width, u)  # fmt: skip
    if "audio" in towers:
        audio = model_config.audio
        if audio.frontend == "raw":
            spatial, channels_in = [audio.clip_samples], 1
        else:
            frames = 1 + audio.clip_samples // audio.hop_length
            bins = audio.n_fft // 2 + 1
            counter.add("audio", 2 * u * frames * bins * audio.mel_bins, False, False)
            spatial, channels_in = [frames], audio.mel_bins
        # The log-mel front end ends in a trained LayerNorm: its input gets a gradient.
        _conv_tower(counter, "audio", spatial, 3, channels_in, tuple(audio.channels),
                    audio.hidden, width, u, input_trained=audio.frontend != "raw")  # fmt: skip
    item_tokens, user_tokens = token_names(towers)
    if "history" in towers:
        heads = model_config.user.num_heads
        _attention(counter, "history", b, 1, shape.history_len, width, heads)
    fusion = model_config.fusion
    tokens = len(item_tokens) + len(user_tokens)
    for _ in range(fusion.num_layers):
        _attention(counter, "fusion", b, tokens, tokens, width, fusion.num_heads)
        counter.add("fusion", 2 * 2 * b * tokens * width * fusion.mlp_dim)
    counter.add("fusion", 2 * b * width * fusion.mlp_dim)  # head hidden
    counter.add("fusion", 2 * b * fusion.mlp_dim)  # head output
    result = {}
    for name, parts in (("forward", counter.forward), ("train", counter.train)):
        result[name] = dict(parts, total=sum(parts.values()))
    return result
