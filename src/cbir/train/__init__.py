"""Fine-tuning descriptors for retrieval: tuples, hard-negative mining, contrastive and
triplet losses, checkpoints (Radenovic, Tolias & Chum, TPAMI 2018; Gordo et al., IJCV 2017)."""

from cbir.train.data import (
    ImageCache,
    TrainData,
    TrainDataError,
    load_class_roots,
    load_pairs_csv,
    load_train_data,
    split_by_class,
    with_holdout,
)
from cbir.train.losses import DEFAULT_MARGINS, contrastive_loss, triplet_loss, tuple_loss
from cbir.train.mining import EpochTuples, mine_epoch, nearest_other_class, sample_queries
from cbir.train.trainer import (
    EpochStats,
    TrainConfig,
    Trainer,
    TrainResult,
    build_optimizer,
    build_training_descriptor,
    default_checkpoint_dir,
    parameter_groups,
    train,
)

__all__ = [
    "DEFAULT_MARGINS",
    "EpochStats",
    "EpochTuples",
    "ImageCache",
    "TrainConfig",
    "TrainData",
    "TrainDataError",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_training_descriptor",
    "contrastive_loss",
    "default_checkpoint_dir",
    "load_class_roots",
    "load_pairs_csv",
    "load_train_data",
    "mine_epoch",
    "nearest_other_class",
    "parameter_groups",
    "sample_queries",
    "split_by_class",
    "train",
    "triplet_loss",
    "tuple_loss",
    "with_holdout",
]
