"""One tiny trained run shared by the evaluation and export tests (training costs CPU).

The run fine-tunes a tiny random BERT (written by transformers, see `_tiny_bert`) with
the ID and history towers on a small synthetic dataset, for a few steps: enough for real
checkpoints, a real text tower inside the parameters and every split. (The image and
audio towers would double the compile time; the code under test treats every content
modality alike.) Test
modules that use it mark themselves `xdist_group(GROUP)` so that they run in one worker
process, which trains once and hands the same folder to all of them.
"""

from __future__ import annotations

from pathlib import Path

from _tiny_bert import make_tiny_bert

from mmrec_jax import train
from mmrec_jax.config import load_config

# xdist group of the modules sharing the run.
GROUP = "tiny_trained_run"

ROOT = Path(__file__).resolve().parents[1]
_RUNS: dict = {}


def trained_run(tmp_path_factory) -> Path:
    """The workdir of the shared run, trained on first use in this process."""
    if "run" not in _RUNS:
        root = tmp_path_factory.mktemp("trained_run")
        make_tiny_bert(root / "bert")
        overrides = {
            "data.data_dir": root / "data",
            "data.synthetic.num_users": 24,
            "data.synthetic.num_items": 40,
            "model.towers": "text,id,history",
            "model.text.model": root / "bert",
            "model.text.mode": "finetune",
            "train.num_steps": 3,
            "train.eval_every": 0,
        }
        config = load_config(
            ROOT / "configs" / "tiny.py", [(k, str(v)) for k, v in overrides.items()]
        )
        train.train_and_evaluate(config, root / "run")
        _RUNS["run"] = root / "run"
    return _RUNS["run"]


def restored_checkpoint(tmp_path_factory) -> tuple:
    """(config, model, params) of the shared run's best checkpoint, restored once."""
    if "restored" not in _RUNS:
        config, model, params, _ = train.restore_params(trained_run(tmp_path_factory))
        _RUNS["restored"] = (config, model, params)
    return _RUNS["restored"]
