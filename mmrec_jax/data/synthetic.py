"""`mmrec_synthetic`: a generated dataset with a known optimum, the embedded default.

    python -m mmrec_jax.data.synthetic --output DATA_DIR [--seed 0] [--num_users N]
        [--num_items M] [--cold_item_share 0.2] [--missing_share 0.1] [--overwrite]

Every item has three independent latent attributes, one per modality, each taking one
of `NUM_VALUES` values:

- a topic, carried by its text: English sentences built from topic word lists
  (cooking, space, football, gardening), mixed with topic-free filler sentences;
- a visual style, carried by its image: a 56x56 RGB drawing whose shape, colour and
  texture encode the style (red circles, striped green squares, dotted blue triangles,
  checkered yellow crosses), at random places and sizes, with colour jitter, a random
  grey background and pixel noise;
- a sound, carried by its audio: a 0.5 s clip at 8 kHz whose pitch, timbre and rhythm
  encode the sound (a steady low hum, a pulsed square-wave beep, high plucks, a
  trembling hiss), with pitch, gain and timing jitter and background noise.

Each user belongs to one of `NUM_SEGMENTS` taste segments that favours one value of each
attribute; the user's preference for value v of modality m is +1 for the favourite and
-1/3 otherwise, plus a small personal deviation. Users also have a bias and items a
popularity:

    P(click) = sigmoid(SCALE * (text pref + image pref + audio pref) + user bias + popularity)

where a modality the item lacks (a `missing_share` of items per modality) contributes 0:
what is not shown cannot appeal. Each modality alone explains a third of the preference
signal. Labels are sampled from these probabilities and the probabilities are kept
(`true_prob`), so the oracle AUC and logloss of every split are known; they are stored
in the metadata and printed when the dataset is built.

Each user has 40-80 train interactions with warm items (time ordered), then 5
validation and 5 test interactions with other warm items and 5 test_cold interactions
with cold items (a `cold_item_share` of the catalogue, never shown in training). A
validation or test item that happens not to occur in train is moved to test_cold, so
test holds only items seen in training and test_cold only items never seen.

The item table also stores the latent `topic`, `style` and `sound` of every item, and
each interaction its `true_prob`, for analysis; the pipeline does not read them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmrec_jax.cli import HelpFormatter, exits_quietly, require_writable_folder
from mmrec_jax.data import builder, media

NAME = "mmrec_synthetic"
# Values per latent attribute (topics, styles, sounds).
NUM_VALUES = 4
# Taste segments; each favours one value of each attribute.
NUM_SEGMENTS = 8
# Multiplier of the summed preferences in the click logit.
SCALE = 4.0
# Standard deviation of a user's personal deviation from the segment's preferences.
PREF_NOISE = 0.04
# Standard deviations of user bias and item popularity (logit units). Small enough that
# a user's ~60 train interactions pin the bias down and that cold items (whose
# popularity no model can know) stay within reach of the oracle.
USER_BIAS_STD = 0.15
POPULARITY_STD = 0.1
# Train interactions per user (inclusive range) and per-user evaluation interactions.
TRAIN_PER_USER = (40, 80)
EVAL_PER_USER = 5
# Media sizes.
IMAGE_SIZE = 56
AUDIO_SAMPLE_RATE = 8000
AUDIO_SAMPLES = 4000
# History entries stored per interaction (the pipeline uses the first history_len).
HISTORY_LEN = builder.DEFAULT_HISTORY_LEN
# Minimum sizes for a meaningful dataset.
MIN_USERS, MIN_ITEMS = 2, 20

TOPICS = {
    "cooking": {
        "noun": [
            "recipe",
            "kitchen",
            "garlic",
            "oven",
            "pasta",
            "soup",
            "bread",
            "onion",
            "butter",
            "dough",
            "sauce",
            "chef",
            "skillet",
            "dinner",
            "pie",
            "spice",
        ],
        "verb": ["bake", "simmer", "chop", "roast", "season", "whisk", "stir", "grill"],
        "adj": ["crispy", "savory", "homemade", "spicy", "tender", "golden", "buttery"],
    },
    "space": {
        "noun": [
            "galaxy",
            "planet",
            "rocket",
            "telescope",
            "orbit",
            "astronaut",
            "nebula",
            "comet",
            "moon",
            "satellite",
            "star",
            "asteroid",
            "spacecraft",
            "launch pad",
        ],
        "verb": ["launch", "orbit", "explore", "observe", "land on", "photograph"],
        "adj": ["distant", "cosmic", "bright", "lunar", "interstellar", "icy", "vast"],
    },
    "football": {
        "noun": [
            "goal",
            "striker",
            "match",
            "stadium",
            "referee",
            "league",
            "penalty",
            "midfielder",
            "team",
            "coach",
            "season",
            "goalkeeper",
            "derby",
            "free kick",
        ],
        "verb": ["score", "tackle", "pass", "defend", "shoot", "dribble past", "coach"],
        "adj": ["dramatic", "late", "brilliant", "tactical", "decisive", "fierce"],
    },
    "gardening": {
        "noun": [
            "garden",
            "tomato",
            "soil",
            "seed",
            "rose",
            "compost",
            "greenhouse",
            "tulip",
            "hedge",
            "orchard",
            "herb",
            "shovel",
            "flower bed",
            "seedling",
            "vine",
        ],
        "verb": ["plant", "prune", "water", "harvest", "grow", "dig", "weed"],
        "adj": ["blooming", "fertile", "shady", "organic", "seasonal", "lush", "green"],
    },
}
TOPIC_NAMES = tuple(TOPICS)
TEMPLATES = (
    "How to {verb} the {adj} {noun}.",
    "The {noun} was {adj} and the {noun2} was {adj2}.",
    "We {verb} a {adj} {noun} next to the {noun2}.",
    "Notes on the {noun}, the {noun2} and the {noun3}.",
    "Everything you need to know about the {adj} {noun}.",
    "A short story about a {noun} and a {adj} {noun2}.",
    "Why every {noun} needs a {adj} {noun2}.",
    "Learn to {verb} like a pro with this {adj} {noun}.",
)
FILLERS = (
    "Recorded last week.",
    "Part two of the series.",
    "Shared by a friend of ours.",
    "Filmed in one take.",
    "Thanks for watching.",
    "More to come soon.",
    "A quick one for the weekend.",
)
STYLE_NAMES = ("red circles", "striped green squares", "dotted blue triangles", "yellow crosses")
SOUND_NAMES = ("low hum", "pulsed beep", "high plucks", "trembling hiss")


# ------------------------------------------------------------------------------ content


def render_text(topic: int, rng: np.random.Generator) -> str:
    """Two sentences about topic `topic` and, half the time, a topic-free filler."""
    words = TOPICS[TOPIC_NAMES[topic]]
    sentences = []
    for _ in range(2):
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        nouns = rng.choice(words["noun"], size=3, replace=False)
        adjs = rng.choice(words["adj"], size=2, replace=False)
        sentence = template.format(
            verb=words["verb"][rng.integers(len(words["verb"]))],
            noun=nouns[0],
            noun2=nouns[1],
            noun3=nouns[2],
            adj=adjs[0],
            adj2=adjs[1],
        )
        sentences.append(sentence[0].upper() + sentence[1:])
    if rng.random() < 0.5:
        sentences.insert(int(rng.integers(3)), FILLERS[rng.integers(len(FILLERS))])
    return " ".join(sentences)


def _shape_mask(style: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool mask of 1-3 shapes of the style's kind at random places and sizes."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        radius = int(rng.integers(8, 15))
        cx, cy = (int(v) for v in rng.integers(radius // 2, IMAGE_SIZE - radius // 2, size=2))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if style == 0:
            draw.ellipse(box, fill=255)
        elif style == 1:
            draw.rectangle(box, fill=255)
        elif style == 2:
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], 255
            )
        else:
            arm = max(3, radius // 3)
            draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=255)
            draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=255)
    return np.asarray(mask) > 0


def render_image(style: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (56, 56, 3): the style's shapes, colours and texture on a noisy grey ground."""
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size]
    base = {0: (215, 45, 40), 1: (40, 185, 60), 2: (45, 80, 215), 3: (235, 200, 35)}[style]
    color = np.clip(np.array(base) + rng.normal(0, 18, 3), 0, 255)
    if style == 0:  # solid
        texture = np.ones((size, size))
    elif style == 1:  # horizontal stripes
        texture = np.where(((yy + rng.integers(4)) // 2) % 2 == 0, 1.0, 0.55)
    elif style == 2:  # light dots
        texture = np.where((yy % 5 == 0) & (xx % 5 == 0), 2.2, 1.0)
    else:  # checker
        texture = np.where(((yy // 3) + (xx // 3)) % 2 == 0, 1.0, 0.6)
    foreground = np.clip(color[None, None, :] * texture[..., None], 0, 255)
    ground = rng.uniform(70, 180) + rng.normal(0, 6, 3)
    pixels = np.broadcast_to(ground, (size, size, 3)).copy()
    mask = _shape_mask(style, rng)
    pixels[mask] = foreground[mask]
    pixels += rng.normal(0, 12, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_audio(sound: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (4000,) at 8 kHz: the sound's pitch, timbre and rhythm, with noise."""
    t = np.arange(AUDIO_SAMPLES) / AUDIO_SAMPLE_RATE
    jitter = rng.uniform(0.94, 1.06)
    phase = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0, 1)
    if sound == 0:  # low hum: pure low sine, steady
        wave = np.sin(2 * np.pi * 220 * jitter * t + phase)
    elif sound == 1:  # pulsed beep: odd harmonics of 440 Hz, gated at 6 Hz
        f0 = 440 * jitter
        wave = sum(np.sin(2 * np.pi * k * f0 * t + phase) / k for k in (1, 3, 5))
        wave = wave * (((t * 6 + offset) % 1.0) < 0.5)
    elif sound == 2:  # high plucks: bright harmonics of 880 Hz, decaying, 4 per second
        f0 = 880 * jitter
        wave = sum(np.sin(2 * np.pi * k * f0 * t + phase) / k for k in (1, 2, 3, 4))
        wave = wave * np.exp(-((t * 4 + offset) % 1.0) * 6)
    else:  # trembling hiss: noise around 2 kHz with a 10 Hz tremolo
        carrier = np.sin(2 * np.pi * 2000 * jitter * t + phase)
        band = np.convolve(rng.normal(0, 1, t.shape[0]), np.ones(6) / 6, mode="same")
        wave = carrier * band * 2.5 * (0.6 + 0.4 * np.sin(2 * np.pi * 10 * (t + offset)))
    wave = wave / max(np.abs(wave).max(), 1e-6) * rng.uniform(0.3, 0.7)
    wave = wave + rng.normal(0, rng.uniform(0.01, 0.03), wave.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------- generation


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def oracle_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC and logloss of the true click probabilities on sampled labels."""
    from mmrec_jax import metrics

    auc = metrics.auc(labels, probs) if 0 < labels.sum() < labels.shape[0] else None
    return {
        "auc": auc,
        "logloss": metrics.logloss(labels, probs),
        "examples": int(labels.shape[0]),
        "positive_rate": float(labels.mean()),
    }


def generate(
    num_users: int = 1000,
    num_items: int = 1200,
    seed: int = 0,
    cold_item_share: float = 0.2,
    missing_share: float = 0.1,
) -> builder.DatasetContent:
    """Generates the whole dataset deterministically from its arguments.

    Args:
      num_users: users (at least 2).
      num_items: items in the catalogue (at least 20).
      seed: random seed; the same arguments give the same dataset, byte for byte.
      cold_item_share: share of items held out of training (they appear in test_cold).
      missing_share: share of items lacking each modality (independently per modality).

    Returns:
      The dataset content (see `builder.prepare`).
    """
    if num_users < MIN_USERS or num_items < MIN_ITEMS:
        raise ValueError(
            f"mmrec_synthetic needs at least {MIN_USERS} users and {MIN_ITEMS} items; got "
            f"num_users={num_users}, num_items={num_items}."
        )
    if not 0.0 < cold_item_share < 0.5:
        raise ValueError(f"cold_item_share={cold_item_share} must lie in (0, 0.5).")
    if not 0.0 <= missing_share < 1.0:
        raise ValueError(f"missing_share={missing_share} must lie in [0, 1).")
    rng = np.random.default_rng(seed)
    k = NUM_VALUES

    # Items: latent attributes, popularity, missing modalities, cold or warm.
    attrs = rng.integers(0, k, size=(num_items, 3))  # (N, 3): topic, style, sound
    popularity = rng.normal(0, POPULARITY_STD, num_items)
    has = rng.random((num_items, 3)) >= missing_share  # (N, 3)
    cold = np.zeros(num_items, bool)
    cold[rng.permutation(num_items)[: max(1, round(cold_item_share * num_items))]] = True
    warm_rows, cold_rows = np.flatnonzero(~cold), np.flatnonzero(cold)

    # Users: a taste segment each (segments favour distinct value triples), a personal
    # deviation and a bias.
    combos = rng.permutation(k**3)[:NUM_SEGMENTS]
    favourites = np.stack([combos // (k * k), (combos // k) % k, combos % k], axis=1)
    segment = rng.integers(0, NUM_SEGMENTS, num_users)
    prefs = np.full((num_users, 3, k), -1.0 / (k - 1))
    prefs[np.arange(num_users)[:, None], np.arange(3)[None, :], favourites[segment]] = 1.0
    prefs += rng.normal(0, PREF_NOISE, prefs.shape)
    bias = rng.normal(0, USER_BIAS_STD, num_users)

    # Interactions: per user, time-ordered train, validation, then test and test_cold.
    users, items, splits, times = [], [], [], []
    clock = np.int64(1_700_000_000)
    for user in range(num_users):
        n_eval = min(EVAL_PER_USER, max(1, (warm_rows.shape[0] - 1) // 3))
        n_train = int(rng.integers(TRAIN_PER_USER[0], TRAIN_PER_USER[1] + 1))
        n_train = max(1, min(n_train, warm_rows.shape[0] - 2 * n_eval))
        seen = rng.choice(warm_rows, n_train + 2 * n_eval, replace=False)
        new = rng.choice(cold_rows, min(EVAL_PER_USER, cold_rows.shape[0]), replace=False)
        late = np.concatenate([seen[n_train + n_eval :], new])
        late_split = np.array([2] * n_eval + [3] * new.shape[0])
        shuffle = rng.permutation(late.shape[0])
        rows = np.concatenate([seen[: n_train + n_eval], late[shuffle]])
        codes = np.concatenate([[0] * n_train, [1] * n_eval, late_split[shuffle]])
        gaps = rng.integers(60, 86_400, rows.shape[0])
        users.append(np.full(rows.shape[0], user))
        items.append(rows)
        splits.append(codes)
        times.append(clock + np.cumsum(gaps))
    user_rows = np.concatenate(users).astype(np.int32)
    item_rows = np.concatenate(items).astype(np.int32)
    split = np.concatenate(splits).astype(np.int8)
    timestamp = np.concatenate(times).astype(np.int64)
    # Items of validation/test that no train interaction shows are cold: move them.
    in_train = np.zeros(num_items, bool)
    in_train[item_rows[split == 0]] = True
    split[(split > 0) & ~in_train[item_rows]] = 3

    pref_terms = prefs[user_rows[:, None], np.arange(3)[None, :], attrs[item_rows]]  # (n, 3)
    logit = SCALE * (pref_terms * has[item_rows]).sum(1) + bias[user_rows] + popularity[item_rows]
    true_prob = _sigmoid(logit).astype(np.float32)
    label = (rng.random(true_prob.shape[0]) < true_prob).astype(np.float32)

    # Content.
    texts, images, audios = [], [], []
    for row in range(num_items):
        text = render_text(int(attrs[row, 0]), rng)
        pixels = render_image(int(attrs[row, 1]), rng)
        wave = render_audio(int(attrs[row, 2]), rng)
        texts.append(text if has[row, 0] else "")
        images.append(media.encode_png(pixels) if has[row, 1] else b"")
        audios.append(media.encode_wav(wave, AUDIO_SAMPLE_RATE) if has[row, 2] else b"")
    item_table = builder.ItemTable(
        keys=[f"item{row:06d}" for row in range(num_items)],
        texts=texts,
        images=images,
        audios=audios,
        extra={
            "topic": attrs[:, 0].astype(np.int32),
            "style": attrs[:, 1].astype(np.int32),
            "sound": attrs[:, 2].astype(np.int32),
        },
    )
    interactions = builder.InteractionTable(
        user=user_rows,
        item=item_rows,
        label=label,
        timestamp=timestamp,
        split=split,
        extra={"true_prob": true_prob},
    )
    oracle = {}
    for code, name in enumerate(builder.SPLITS):
        select = split == code
        if select.any():
            oracle[name] = oracle_metrics(label[select], true_prob[select])
    metadata = {
        "source": "mmrec_jax.data.synthetic",
        "oracle": oracle,
        "image_size": IMAGE_SIZE,
        "audio_sample_rate": AUDIO_SAMPLE_RATE,
        "audio_max_samples": AUDIO_SAMPLES,
        "generator": {
            "num_users": num_users,
            "num_items": num_items,
            "seed": seed,
            "cold_item_share": cold_item_share,
            "missing_share": missing_share,
            "num_values": k,
            "num_segments": NUM_SEGMENTS,
            "scale": SCALE,
        },
        "attribute_names": {
            "topic": list(TOPIC_NAMES),
            "style": list(STYLE_NAMES),
            "sound": list(SOUND_NAMES),
        },
    }
    return builder.prepare(
        NAME,
        item_table,
        [f"user{row:06d}" for row in range(num_users)],
        interactions,
        HISTORY_LEN,
        metadata,
    )


class MmrecSynthetic(builder.MmrecBuilder):
    """TFDS builder of `mmrec_synthetic` (registered: `tfds.builder("mmrec_synthetic")`)."""

    name = NAME
    EXTRA_FEATURES = {
        builder.INTERACTIONS: {"true_prob": np.float32},
        builder.ITEMS: {"topic": np.int32, "style": np.int32, "sound": np.int32},
    }
    HISTORY_LEN = HISTORY_LEN

    def __init__(
        self,
        *,
        num_users: int = 1000,
        num_items: int = 1200,
        seed: int = 0,
        cold_item_share: float = 0.2,
        missing_share: float = 0.1,
        **kwargs,
    ):
        self._generator_args = dict(
            num_users=num_users,
            num_items=num_items,
            seed=seed,
            cold_item_share=cold_item_share,
            missing_share=missing_share,
        )
        super().__init__(**kwargs)

    def _make_content(self) -> builder.DatasetContent:
        return generate(**self._generator_args)


def format_summary(content: builder.DatasetContent) -> str:
    """Sizes, modality coverage and oracle metrics of a generated dataset, as text."""
    meta = content.metadata
    lines = [
        f"{meta['name']}: {meta['num_user_rows']} users, {meta['num_item_rows']} items "
        f"({meta['num_items']} seen in training), modalities "
        + ", ".join(f"{m} {meta['items_with'][m]}" for m in builder.MODALITIES),
        f"{'split':<11} {'examples':>8} {'positive':>8} {'oracle AUC':>10} {'logloss':>8}",
    ]
    for split in builder.SPLITS:
        oracle = (meta["oracle"] or {}).get(split)
        if oracle is None:
            lines.append(f"{split:<11} {0:>8}")
            continue
        auc = "-" if oracle["auc"] is None else f"{oracle['auc']:.4f}"
        lines.append(
            f"{split:<11} {oracle['examples']:>8} {oracle['positive_rate']:>8.3f} "
            f"{auc:>10} {oracle['logloss']:>8.4f}"
        )
    return "\n".join(lines)


def build(
    data_dir: str | Path,
    num_users: int = 1000,
    num_items: int = 1200,
    seed: int = 0,
    cold_item_share: float = 0.2,
    missing_share: float = 0.1,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Generates `mmrec_synthetic` and writes it into `data_dir`.

    Returns:
      DATA_DIR/mmrec_synthetic.

    Raises:
      builder.DatasetExistsError: it exists and `overwrite` is False.
    """
    args = dict(
        num_users=num_users,
        num_items=num_items,
        seed=seed,
        cold_item_share=cold_item_share,
        missing_share=missing_share,
    )
    start = time.perf_counter()
    if verbose:
        print(
            f"Generating {NAME} ({num_users} users, {num_items} items, seed {seed})...", flush=True
        )
    content = generate(**args)
    if verbose:
        print(f"Writing {NAME} to {Path(data_dir) / NAME} ...", flush=True)
    target = builder.write_dataset(
        content, data_dir, lambda **kw: MmrecSynthetic(**args, **kw), overwrite
    )
    if verbose:
        print(format_summary(content))
        print(f"Built {NAME} in {time.perf_counter() - start:.1f} s: {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> None:
    """Command line: generate `mmrec_synthetic` into a data folder."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrec_jax.data.synthetic",
        formatter_class=HelpFormatter,
        description="Generate the mmrec_synthetic dataset (TFDS, ArrayRecord).",
    )
    parser.add_argument("--output", required=True, help="data folder (DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--num_users", type=int, default=800, help="users (as configs/default.py)")
    parser.add_argument("--num_items", type=int, default=1200, help="items (as configs/default.py)")
    parser.add_argument(
        "--cold_item_share", type=float, default=0.2, help="share of items never in training"
    )
    parser.add_argument(
        "--missing_share", type=float, default=0.1, help="share of items lacking each modality"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
    args = parser.parse_args(argv)
    require_writable_folder(parser, "--output", args.output)
    try:
        with exits_quietly(parser, exit_process=argv is None):
            build(
                args.output,
                num_users=args.num_users,
                num_items=args.num_items,
                seed=args.seed,
                cold_item_share=args.cold_item_share,
                missing_share=args.missing_share,
                overwrite=args.overwrite,
            )
    except (ValueError, builder.DatasetExistsError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
