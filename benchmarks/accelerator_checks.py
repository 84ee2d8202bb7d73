"""The accelerator runs of BENCHMARKS.md ("On a GPU") in one go, each in its own process.

    python benchmarks/accelerator_checks.py OUT_DIR [--timeout 420] \\
        [-- EXTRA train_throughput.py ARGUMENTS]

Runs `train_throughput.py` on `configs/seed.py` with BERT-base shapes and random weights
(`--random_text_weights`; the config's `model.dtype = "auto"` computes in bfloat16 on a
GPU or TPU) three times: the train step, the forward pass (`--inference`) and the train
step at 128 tokens. Each run is a process of its own (its own device memory and compile
count) under a time limit, so one that fails or hangs leaves the others' results. Writes
`OUT_DIR/<run>.log` (the run's whole output), `OUT_DIR/<run>.json` (its JSON line) and
`OUT_DIR/summary.md`, a table of samples/s, step time, compile time, TFLOP/s and the
fraction of the bfloat16 matmul peak measured in the same run (the issue's target on a
GPU: at least 0.40 for the train step), and prints the table last. Exits with status 1
when a run failed.

Arguments after `--` go to every run, after the script's own, so they override them:
`--random_text_tokenizer FOLDER` where the packaged all-MiniLM-L6-v2 tokenizer (which
has bert-base-uncased's vocabulary) is not installed, or `--steps N`.

The script itself needs only Python's standard library, so that it can say which of the
benchmark's packages an interpreter lacks (`--python`, default: the one running it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Arguments of every run: the seed's shapes without the model hub.
BASE_ARGUMENTS = ("--config", "configs/seed.py", "--random_text_weights", "--steps", "20")
# Each run's name and its own arguments.
RUNS = {
    "train": (),
    "inference": ("--inference",),
    "train_128_tokens": ("--config.data.max_text_len=128", "--steps", "10"),
}
# Modules `train_throughput.py` needs that a machine with JAX may lack.
REQUIRED_MODULES = (
    "jax",
    "flax",
    "optax",
    "orbax.checkpoint",
    "transformers",
    "safetensors",
    "ml_collections",
    "absl",
)


def _seconds(text: str) -> int:
    """An argparse `type`: whole seconds >= 1 (`common.at_least` imports JAX, which the
    interpreter running this script may not have)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below the minimum 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s OUT_DIR [--timeout S] [--python PY] [-- TRAIN_THROUGHPUT_ARGS ...]",
    )
    parser.add_argument("out_dir", type=Path, help="folder for the logs, JSON and summary")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=420,
        help="seconds each run may take (default 420)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs train_throughput.py (default: this one)",
    )
    return parser


# Prints the names among argv[1:] that the interpreter cannot find, one per line.
_FIND_MODULES = """
import importlib.util, sys
for name in sys.argv[1:]:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if not found:
        print(name)
"""


def _environment() -> dict[str, str]:
    """This process's environment with the repository on PYTHONPATH (for `mmrec_jax`)."""
    paths = [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def missing_modules(python: str, names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    """The modules of `names` that `python` cannot import (all of them if it does not run)."""
    try:
        done = subprocess.run(
            [python, "-c", _FIND_MODULES, *names],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return list(names)
    return done.stdout.split() if done.returncode == 0 else list(names)


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_one(name: str, command: list[str], out_dir: Path, timeout: int) -> dict:
    """Runs one benchmark process; its row of the summary (`error` set when it failed)."""
    print(f"[{name}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=timeout,
        )
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = "".join(
            part.decode() if isinstance(part, bytes) else part or ""
            for part in (expired.stdout, expired.stderr)
        )
        status = None
    (out_dir / f"{name}.log").write_text(output)
    result = _last_json_line(output)
    row = {"run": name, "wall_s": round(time.perf_counter() - start, 1), "result": result}
    if status is None:
        row["error"] = f"stopped after --timeout {timeout} s"
    elif status != 0:
        last = output.strip().splitlines()[-1:]
        row["error"] = f"exit status {status}" + (f": {last[0]}" if last else "")
    if result is not None:
        (out_dir / f"{name}.json").write_text(json.dumps(result) + "\n")
    elif "error" not in row:
        row["error"] = "no JSON line in its output"
    outcome = f"failed: {row['error']}" if "error" in row else "done"
    print(f"[{name}] {outcome} in {row['wall_s']} s", flush=True)
    return row


def _tera(gflops: float | None) -> str:
    return "" if gflops is None else f"{gflops / 1000:.1f}"


# The summary's columns after the run's name: heading, and the cell from a run's JSON.
_COLUMNS = (
    ("samples/s", lambda r: r.get("samples_per_s")),
    ("step ms (median / min)", lambda r: f"{r.get('step_ms_median')} / {r.get('step_ms_min')}"),
    ("compile s", lambda r: r.get("compile_s")),
    ("TFLOP/s", lambda r: _tera(r.get("gflops_per_s"))),
    ("of the peak", lambda r: r.get("fraction_of_peak")),
    ("peak TFLOP/s", lambda r: _tera(r.get("peak_gflops_per_s"))),
    ("dtype", lambda r: r.get("dtype")),
    ("devices", lambda r: r.get("devices")),
)


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of the runs' rates, one row per run; a failed run says why."""
    lines = [
        "| run | " + " | ".join(heading for heading, _ in _COLUMNS) + " |",
        "|---|" + "---:|" * (len(_COLUMNS) - 2) + "---|---|",
    ]
    for row in rows:
        if row["result"] is None:
            cells = [f"failed: {row['error']}"] + [""] * (len(_COLUMNS) - 1)
        else:
            cells = [cell(row["result"]) for _, cell in _COLUMNS]
            cells = ["" if value is None else str(value) for value in cells]
        name = row["run"]
        if row["result"] is not None and "error" in row:  # e.g. a second compilation
            name += f" (failed: {row['error']})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after the first `--` goes to train_throughput.py untouched.
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    extra = argv[split + 1 :]
    missing = missing_modules(args.python)
    if missing:
        sys.exit(
            f"{args.python} cannot import {', '.join(missing)}: install the project "
            "(`pip install -e .`) or those packages, or name another interpreter with --python."
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    script = str(HERE / "train_throughput.py")
    rows = [
        run_one(
            name,
            [args.python, script, *BASE_ARGUMENTS, *own, *extra],
            args.out_dir,
            args.timeout,
        )
        for name, own in RUNS.items()
    ]
    table = summary_table(rows)
    (args.out_dir / "summary.md").write_text(table)
    print(table, end="")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
