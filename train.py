"""Trains, evaluates and checkpoints a multimodal recommender.

    python train.py --config configs/default.py --workdir runs/demo \
        [--config.train.batch_size=64 ...]

A workdir that already holds checkpoints is resumed from the latest one.
"""

import argparse

from mmrec_jax.cli import (
    add_config_argument,
    exits_quietly,
    parse_config_args,
    show_warnings_plainly,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    parser.add_argument("--workdir", required=True, help="folder for checkpoints, logs, plots")
    # From reading the config to the final report.
    with exits_quietly(parser, exit_process=True):
        args, config = parse_config_args(parser)
        show_warnings_plainly()
        _train(parser, args, config)


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, config) -> None:
    from mmrec_jax import runtime, train, train_step
    from mmrec_jax.checkpoint import CheckpointError
    from mmrec_jax.config import ConfigError
    from mmrec_jax.data.builder import DatasetDamagedError
    from mmrec_jax.data.pipeline import DatasetMismatchError, DatasetNotBuiltError
    from mmrec_jax.hub import PretrainedModelNotFound

    runtime.use_native_gpu_atomics()
    train_step.set_up_cpu_host(config)
    try:
        train.train_and_evaluate(config, args.workdir)
    except PretrainedModelNotFound as error:
        parser.exit(2, f"{parser.prog}: error: config.model.text.model: {error}\n")
    except (ConfigError, DatasetNotBuiltError, DatasetMismatchError) as error:
        # A config that does not fit the dataset, the machine or the workdir's run: the
        # message says the fix.
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except (
        CheckpointError,
        train.TrainingDiverged,
        train.OutOfMemory,
        train.StorageError,
        DatasetDamagedError,
    ) as error:
        # The message names the cause and the fix; a traceback would bury it.
        parser.exit(1, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    from mmrec_jax import runtime

    runtime.restart_with_huge_pages()
    main()
