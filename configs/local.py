"""Training on a dataset built by `mmrec_jax.data.local` or `mmrec_jax.data.movielens`.

    python train.py --config configs/local.py --workdir runs/NAME \
        --config.data.name=NAME --config.data.data_dir=DATA_DIR

Any modality mix works: every tower is listed, and the training code drops the content
towers whose modality the dataset lacks (its DatasetInfo.modalities), so a text-only
dataset (MovieLens) trains with text, id and history. Positives-only data gets
`data.negatives_per_positive` sampled negatives per positive; labelled data is used as
it is.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the config for an imported dataset."""
    config = default.get_config()
    # The dataset name given to the importer (--name); set it on the command line.
    config.data.name = "mmrec_local"
    # The importer's --output folder; set it on the command line.
    config.data.data_dir = "data"
    # Negatives per positive when the dataset holds positives only (ignored otherwise).
    config.data.negatives_per_positive = 4
    # Every tower; those of modalities the dataset lacks are turned off at start.
    config.model.towers = "text,image,audio,id,history"
    # Passes at most; early stopping below usually ends the run sooner.
    config.train.num_epochs = 10
    # Stop after this many evaluations without a better validation AUC; reports use the
    # best checkpoint (ml-latest-small peaks after about 2 passes, then overfits).
    config.train.early_stopping_patience = 3
    return config
