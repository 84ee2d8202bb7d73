"""The README's Python examples run as written (those that need no trained run)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mmrec_jax import train_step

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _block_with(call: str) -> str:
    blocks = [b for b in _python_blocks() if call in b]
    assert len(blocks) == 1, f"README should hold one Python example calling {call}"
    return blocks[0]


@pytest.fixture
def in_repo_root():
    cwd = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(cwd)


def test_recommender_example_and_the_train_step_example_continuing_it(in_repo_root):
    namespace = {}
    exec(_block_with("build_model("), namespace)
    assert namespace["logits"].shape == (1,)
    assert np.isfinite(namespace["logits"]).all()
    assert namespace["train_logits"].shape == (1,)
    assert np.isfinite(namespace["train_logits"]).all()
    width = namespace["config"].model.width
    assert namespace["items"]["embedding"].shape == (1, width)
    exec(_block_with("train_step.build_train_state("), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state["step"]) == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert float(metrics["grad_norm"]) > 0
    # A second step (the warm-up schedule's first rate is 0) moves the parameters away from
    # their initial values, built again: the step donated the first ones.
    config, model, mesh = namespace["config"], namespace["model"], namespace["mesh"]
    state, _ = namespace["step"](state, namespace["global_batch"])
    again = train_step.build_train_state(config, model, mesh, namespace["global_batch"], 100)
    initial = jax.tree.leaves(again.state["params"])
    trained = jax.tree.leaves(state["params"])
    assert len(initial) == len(trained)
    assert any(not np.allclose(a, b) for a, b in zip(initial, trained, strict=True))


def test_bert_example(in_repo_root):
    namespace = {}
    exec(_block_with("load_pretrained("), namespace)
    hidden, pooled = namespace["hidden"], namespace["pooled"]
    assert hidden.shape[0] == 1 and hidden.shape[2] == 384  # all-MiniLM-L6-v2's width
    assert pooled.shape == (1, 384)


def test_the_functions_the_readme_calls_resolve_as_written():
    # In a fresh interpreter: in this one, the tests have imported every submodule.
    text = (ROOT / "README.md").read_text()
    dotted = sorted(set(re.findall(r"\bmmrec_jax((?:\.\w+)+)\(", text)))
    media_calls = sorted(set(re.findall(r"\bmedia\.(\w+)\(", text)))
    assert {".item_text_fields", ".load_export_config", ".ExportedRecommender"} <= set(dotted)
    assert {"decode_image", "decode_audio"} <= set(media_calls)
    script = "import mmrec_jax\nfrom mmrec_jax.data import media\n" + "".join(
        [f"assert callable(mmrec_jax{name}), {name!r}\n" for name in dotted]
        + [f"assert callable(media.{name}), {name!r}\n" for name in media_calls]
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
