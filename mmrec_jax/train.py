"""The training loop (see the Training issue): not implemented yet."""


def train_and_evaluate(config, workdir: str) -> None:
    """Trains and evaluates `config` in `workdir`."""
    raise NotImplementedError(
        "Training is not implemented yet: the train loop lands with the Training work. "
        "The configs, data and models can already be used from Python."
    )
