"""A tiny configuration for tests and smoke runs: seconds on a CPU."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config shrunk to test size."""
    config = default.get_config()
    # A small synthetic dataset, built in a second or two, in its own folder.
    config.data.data_dir = "data/tiny"
    config.data.synthetic.num_users = 60
    config.data.synthetic.num_items = 80
    config.data.max_text_len = 16
    config.data.history_len = 4
    config.model.width = 32
    # The synthetic 56x56 images, resized as they are decoded: a fifth of the conv work.
    config.model.image.size = 24
    config.model.image.channels = (4, 8)
    # 6x6x8 features to 64: 18,432 weights, an array large enough for FSDP to split.
    config.model.image.hidden = 64
    config.model.audio.channels = (4, 8)
    config.model.audio.hidden = 32
    config.model.audio.mel_bins = 16
    config.model.user.num_heads = 2
    config.model.fusion.num_layers = 1
    config.model.fusion.num_heads = 2
    config.model.fusion.mlp_dim = 32
    config.train.batch_size = 32
    config.train.num_epochs = 1
    config.train.warmup_steps = 2
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.log_every = 5
    return config
