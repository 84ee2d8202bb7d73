"""A tiny random BERT checkpoint written by `transformers` itself, for the text tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

# The tiny tokenizer's vocabulary: BERT's special tokens, then a few words.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a cat dog video music the quick brown fox jumps over lazy song of about rain night".split()
)


def write_tiny_tokenizer(folder: Path) -> None:
    """A word-level BERT tokenizer over `WORDS` (vocab.txt; readable by 4.x and 5.x)."""
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "BertTokenizer", "do_lower_case": true}\n'
    )


def make_tiny_bert(folder: Path, *, pooler: bool = True, seed: int = 0) -> transformers.BertModel:
    """Saves a random 2-layer PyTorch BertModel (and a tokenizer) to `folder`.

    Every parameter, LayerNorms included, is perturbed so that no weight is left at a
    value (ones, zeros) that a wrong mapping could reproduce by accident.
    """
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        layer_norm_eps=1e-3,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=pooler)
    generator = np.random.default_rng(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = generator.normal(0.0, 0.2, size=tuple(param.shape)).astype(np.float32)
            param.add_(torch.from_numpy(noise))
    model.eval()
    model.save_pretrained(str(folder))
    write_tiny_tokenizer(Path(folder))
    return model


def torch_outputs(model: transformers.BertModel, ids, mask, token_types=None):
    """(last_hidden_state, pooler_output or None) of the PyTorch reference, as numpy."""
    inputs = {
        "input_ids": torch.tensor(np.asarray(ids)),
        "attention_mask": torch.tensor(np.asarray(mask)),
    }
    if token_types is not None:
        inputs["token_type_ids"] = torch.tensor(np.asarray(token_types))
    with torch.no_grad():
        out = model(**inputs)
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return out.last_hidden_state.numpy(), pooled
