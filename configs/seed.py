"""The original design's shapes: BERT-base text, 56x56 images, 56-sample raw audio.

Reproduces the original PyTorch design's `MultiModalTransformer` (its section 5.2.2):
a fine-tuned `bert-base-uncased`, Conv 3->64->128 over 56x56 images into a 512-wide
dense layer, Conv1d 1->64->128 over 56 raw samples into 512, attention fusion at
width 512 with 8 heads, Adam at 1e-4 for 10 epochs, BCE with logits (the training
loss). Our fixes stay on: BERT's output is pooled instead of concatenated with the
vectors, and the user towers (ID and history) are kept, since a recommender needs
the user.

`bert-base-uncased` is not packaged offline: it needs the Hugging Face hub (or its
local cache), or a local folder via `--config.model.text.model=/path/to/folder`.
The optimizer is AdamW with a cosine schedule; weight decay 0 and no warmup make it
Adam at 1e-4 decaying to 0 over the run. It computes in bfloat16 on GPU and TPU and in
float32 on CPU (`model.dtype = "auto"`, from the default config).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config with the original design's shapes."""
    config = default.get_config()
    model = config.model
    # The blog's fusion width (nn.MultiheadAttention(embed_dim=512)).
    model.width = 512
    # The blog's text encoder.
    model.text.model = "bert-base-uncased"
    # The blog trains BERT with the rest of the model (no freezing).
    model.text.mode = "finetune"
    # The first token's hidden state, instead of the blog's whole (L, 768) sequence.
    model.text.pooling = "cls"
    # Conv2d(3, 64) then Conv2d(64, 128), each with ReLU and 2x2 max-pool (56 -> 14).
    model.image.channels = (64, 128)
    # nn.Linear(128 * 14 * 14, 512).
    model.image.hidden = 512
    # The blog's Conv1d tower over the raw waveform.
    model.audio.frontend = "raw"
    # 56 samples per clip (Linear(128 * 14, 512) after two 2x pools).
    model.audio.clip_samples = 56
    # Conv1d(1, 64) then Conv1d(64, 128), each with ReLU and 2x max-pool.
    model.audio.channels = (64, 128)
    # nn.Linear(128 * 14, 512).
    model.audio.hidden = 512
    # 8 heads, as the fusion.
    model.user.num_heads = 8
    # One attention layer, as the blog's single nn.MultiheadAttention.
    model.fusion.num_layers = 1
    # nn.MultiheadAttention(num_heads=8).
    model.fusion.num_heads = 8
    # MLP width equal to the model width (the blog has only Linear(512, 1) after attention).
    model.fusion.mlp_dim = 512
    # nn.MultiheadAttention's default dropout is 0.
    model.fusion.dropout = 0.0
    # The blog has no modality dropout.
    model.fusion.modality_dropout = 0.0

    train = config.train
    # optim.Adam(lr=1e-4).
    train.learning_rate = 1e-4
    # No warmup in the blog.
    train.warmup_steps = 0
    # Plain Adam: no weight decay.
    train.weight_decay = 0.0
    # No gradient clipping in the blog.
    train.grad_clip_norm = 0.0
    # One learning rate for every tower.
    train.tower_lr_scale = ""
    # for epoch in range(10).
    train.num_epochs = 10
    return config
