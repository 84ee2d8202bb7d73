"""Process start-up: how long a fresh Python process takes to import the library's
command-line modules, and how much of it the heaviest packages take.

    python benchmarks/startup.py [--runs 5]

Starts `--runs` fresh interpreters (this one, `sys.executable`) one after another, each
importing `mmrec_jax.train`, `mmrec_jax.evaluate` and `mmrec_jax.export` under Python's
`-X importtime`, as every start of train.py, evaluation, export, recommend, a Grain worker
and the test suite's training subprocesses does. Prints one JSON line last: the median wall
seconds of a start, and each listed package's median cumulative import seconds (counted
where it is first imported, so a package imported inside another is part of that one's
time too) with its installed version.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# What a command-line start imports.
MODULES = ("mmrec_jax.train", "mmrec_jax.evaluate", "mmrec_jax.export")
# Packages whose import time is reported (distribution names where they differ).
PACKAGES = {
    "jax": "jax",
    "ml_dtypes": "ml_dtypes",
    "orbax.checkpoint": "orbax-checkpoint",
    "tensorflow_datasets": "tensorflow-datasets",
    "grain": "grain",
    "transformers": "transformers",
}


def import_seconds(importtime_log: str) -> dict[str, float]:
    """Cumulative seconds per module from `python -X importtime`'s stderr lines
    ("import time: self [us] | cumulative | imported package")."""
    seconds = {}
    for line in importtime_log.splitlines():
        if not line.startswith("import time:"):
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if cumulative.strip().isdigit():
            seconds[name.strip()] = int(cumulative) / 1e6
    return seconds


def one_start() -> tuple[float, dict[str, float]]:
    """(wall seconds, cumulative import seconds per module) of one fresh interpreter."""
    command = [sys.executable, "-X", "importtime", "-c", f"import {', '.join(MODULES)}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: importing {', '.join(MODULES)} failed:\n{result.stderr[-2000:]}")
    return wall, import_seconds(result.stderr)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters (default 5)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: start at least one interpreter.")
    starts = [one_start() for _ in range(args.runs)]
    packages = {}
    for name, distribution in PACKAGES.items():
        seconds = [s[name] for _, s in starts if name in s]
        packages[name] = {
            "version": _version(distribution),
            # None: the modules do not import it at start-up.
            "import_s": round(statistics.median(seconds), 4) if seconds else None,
        }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "startup",
        "modules": list(MODULES),
        "runs": args.runs,
        "start_s_median": round(statistics.median(wall for wall, _ in starts), 3),
        "start_s_min": round(min(wall for wall, _ in starts), 3),
        "packages": packages,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": None if load is None else round(load, 2),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
