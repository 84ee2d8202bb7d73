"""What a run tells people: metrics files, TensorBoard events, a summary table, plots.

Only process 0 writes; every other process gets writers that do nothing, so callers
need no `if process_index == 0` of their own.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmrec_jax.files import free_path, write_atomic

# Seconds between a progress bar's updates when stderr is a file or a pipe, not a
# terminal or a notebook: a log gets a line every half minute, not ten a second.
LOG_UPDATE_INTERVAL_S = 30.0


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without importing PyTorch.

    tensorboardX imports PyTorch whenever it is installed, only to accept PyTorch tensors
    (about 2 s and a few hundred MB on a 2-core CPU, in every training process); the
    values written here are Python floats. Unless the process has imported PyTorch
    already, `import torch` fails for the length of tensorboardX's import, which
    tensorboardX expects (it is optional there), and works again after it.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # an ImportError for `import torch`
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class _LogLines:
    """A progress bar's output for a log file or a pipe: each update on a line of its own.

    tqdm redraws its bar in place with carriage returns, and clears it with spaces around
    each message written above it; in a log that leaves every message behind a stale bar
    and a run of blanks. This writer keeps each update as one plain line, and only an
    update whose count moved (not the redraw after a message, nor the final redraw of a
    bar that already showed its last count).
    """

    def __init__(self, stream):
        self.stream = stream
        self.last_count = None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = line.split("[")[0]  # "train:  40%|####      | 4/10 " before the timings
        if not line or count == self.last_count:
            return
        sys.stdout.flush()  # messages printed before this update stay above it
        self.stream.write(line + "\n")
        self.stream.flush()
        self.last_count = count

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    label: str,
    total: int | None = None,
    unit: str = "it",
    *,
    iterable: Iterable | None = None,
    initial: int = 0,
    enabled: bool = True,
    note: str | None = None,
):
    """A tqdm progress bar on stderr, shown by process 0 only.

    In a terminal or a notebook the bar redraws in place; in a log file or a pipe it
    writes a line every `LOG_UPDATE_INTERVAL_S` seconds (and at the end).

    Args:
      label: what the bar counts, e.g. "train".
      total: the count at 100% (default: the length of `iterable`).
      unit: the unit of the count, e.g. "step".
      iterable: items to iterate over through the bar (else call `update`).
      initial: the count to start from (a resumed run's step).
      enabled: False gives a bar that shows nothing (as on the other processes).
      note: shown after the bar from its first line on, until `set_postfix_str` replaces it.
    """
    import jax
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=label,
        unit=unit,
        postfix=note,
        file=sys.stderr if interactive else _LogLines(sys.stderr),
        disable=not enabled or jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else LOG_UPDATE_INTERVAL_S,
        # tqdm's monitor thread redraws a bar that has not printed for `maxinterval`.
        maxinterval=10.0 if interactive else LOG_UPDATE_INTERVAL_S,
    )


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` and TensorBoard event files.

    Args:
      workdir: the run folder.
      enabled: False on processes other than 0 (then nothing is written).
      resume_step: the step the run starts from (its checkpoint's; 0 for a fresh run).
        The steps after it are trained again, so their earlier records are dropped (from
        metrics.jsonl, with any line a killed process cut off, and from TensorBoard's
        view), instead of appearing twice. None keeps every record. A metrics.jsonl with
        damaged lines is first copied to metrics_damaged.jsonl.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            summary_writer = _summary_writer_class()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                records = _records(self.path, keep_damaged=resume_step > 0)
                kept = [json.dumps(r) for r in records if r["step"] <= resume_step]
                write_atomic(self.path, "".join(f"{line}\n" for line in kept))
            purge = None if resume_step is None else resume_step + 1
            self._tensorboard = summary_writer(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records scalar `metrics` (names like "train/loss") at `step`; None values are skipped."""
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        record = {"step": int(step), **metrics}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes the event files."""
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in order (empty if there are none).

    A line a killed process cut off (or any line that is not a record with a step) is
    left out.
    """
    path = Path(workdir) / "metrics.jsonl"
    return _records(path) if path.is_file() else []


def _records(path: Path, keep_damaged: bool = False) -> list[dict]:
    """The records of the metrics file `path`, leaving out lines that are not records.

    With `keep_damaged`, a file with such a line before its last (a last line without
    its newline is one a killed process cut off) is first copied to a free
    metrics_damaged*.jsonl next to it, and the copy is named on stdout.
    """
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        elif number < len(lines) or text.endswith("\n"):
            damaged.append(str(number))
    if keep_damaged and damaged:
        copy = free_path(path.with_name("metrics_damaged.jsonl"))
        shutil.copyfile(path, copy)
        which = (
            f"lines {', '.join(damaged)} are not metrics records"
            if len(damaged) > 1
            else f"line {damaged[0]} is not a metrics record"
        )
        print(
            f"{path}: {which} (damaged). The resumed run leaves them out, and kept the file "
            f"as it was in {copy}."
        )
    return records


def format_cell(value: Any) -> str:
    """A table cell: 4 decimals for floats, "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


# Below this many users (each with a positive and a negative row) a GAUC is said to be noise.
FEW_GAUC_USERS = 20


def summary_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Formats {split: {"model": {...}, "oracle": {...}, "gauc_users": n}} as a text table.

    Columns: each model metric, then each oracle metric as "oracle <name>"; notes follow
    where GAUC is undefined or averages fewer than `FEW_GAUC_USERS` users.
    """
    metric_names: list[str] = []
    oracle_names: list[str] = []
    for entry in summary.values():
        for name in entry.get("model", {}):
            if name not in metric_names:
                metric_names.append(name)
        for name in entry.get("oracle") or {}:
            if name not in oracle_names:
                oracle_names.append(name)
    header = ["split", *metric_names, *(f"oracle {n}" for n in oracle_names)]
    rows = [header]
    for split, entry in summary.items():
        model = entry.get("model", {})
        oracle = entry.get("oracle") or {}
        rows.append(
            [split]
            + [format_cell(model.get(n)) for n in metric_names]
            + [format_cell(oracle.get(n)) for n in oracle_names]
        )
    note = undefined_gauc_note({split: entry.get("model", {}) for split, entry in summary.items()})
    note += few_gauc_users_note(summary)
    return "\n".join(align_table(rows) + note)


def few_gauc_users_note(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A line naming the splits whose GAUC averages fewer than `FEW_GAUC_USERS` users,
    given {split: {"model": click metrics, "gauc_users": int}}; [] if none."""
    few = [
        f"{split} {entry['gauc_users']}"
        for split, entry in summary.items()
        if entry.get("model", {}).get("gauc") is not None
        and entry.get("gauc_users", FEW_GAUC_USERS) < FEW_GAUC_USERS
    ]
    if not few:
        return []
    return [
        f"gauc averages few users (with both a positive and a negative row): {', '.join(few)}; "
        "read it as noise."
    ]


def undefined_gauc_note(click_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Lines saying why a table shows GAUC as "-", given {split: click metrics}; [] if none."""
    splits = [
        split
        for split, metrics in click_metrics.items()
        if "gauc" in metrics and metrics["gauc"] is None and metrics.get("auc") is not None
    ]
    if not splits:
        return []
    return [
        f"gauc -: no user of {', '.join(splits)} has both a positive and a negative row "
        "(as when each user has one held-out row)."
    ]


def align_table(table: list[list[str]]) -> list[str]:
    """Lines of a text table: first column left-aligned, the others right-aligned, and a
    rule under the header row."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(figure, path: Path) -> None:
    """Writes `figure` to `path` as a PNG, whole or not at all."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())


def plot_curves(workdir: str | Path) -> list[Path]:
    """Writes `loss.png` and `auc.png` from `metrics.jsonl`; returns the files written."""
    plt = _pyplot()
    records = read_metrics(workdir)
    written = []
    panels = {
        "loss.png": ("loss", ["train/loss", "validation/logloss"]),
        "auc.png": ("AUC", ["validation/auc"]),
    }
    for filename, (ylabel, names) in panels.items():
        figure, axis = plt.subplots(figsize=(6, 4))
        drawn = False
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=name)
                drawn = True
        if drawn:
            axis.set_xlabel("step")
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            axis.legend()
            path = Path(workdir) / filename
            _save_png(figure, path)
            written.append(path)
        plt.close(figure)
    return written


def plot_calibration(curves: Mapping[str, Mapping], path: str | Path) -> Path:
    """Writes a reliability diagram of one or more splits to `path` (PNG, atomically).

    Args:
      curves: {split: `metrics.calibration_curve(...)`}.
      path: the image file to write.

    Returns:
      `path`.
    """
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    for split, curve in curves.items():
        filled = [
            (p, r)
            for p, r in zip(curve["mean_prob"], curve["positive_rate"], strict=True)
            if p is not None
        ]
        if filled:
            probs, rates = zip(*filled, strict=True)
            top.plot(probs, rates, marker="o", label=split)
        edges = curve["bin_edges"]
        bottom.stairs(curve["count"], edges, label=split)
    top.set_ylabel("fraction of positives")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend()
    top.set_title("Calibration (equal-width bins of the predicted probability)")
    bottom.set_xlabel("predicted click probability")
    bottom.set_ylabel("examples")
    bottom.set_yscale("log")
    bottom.grid(alpha=0.3)
    _save_png(figure, Path(path))
    plt.close(figure)
    return Path(path)
