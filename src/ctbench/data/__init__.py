"""Datasets: MNIST (bundled), CIFAR-10, TinyImageNet-200, as in-memory uint8 tensors."""
from . import cifar10, mnist, tinyimagenet  # noqa: F401  (register the datasets)
from .common import (DATA_DIR_ENV, DATASETS, Augmentation, DataError, Dataset, Split, augment_batch,
                     iterate_batches, load_dataset, num_batches, split_validation)

__all__ = ["DATA_DIR_ENV", "DATASETS", "Augmentation", "DataError", "Dataset", "Split", "augment_batch",
           "iterate_batches", "load_dataset", "num_batches", "split_validation"]
