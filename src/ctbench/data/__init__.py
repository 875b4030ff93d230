"""Datasets: MNIST (bundled), CIFAR-10, TinyImageNet-200 and your own files, as in-memory tensors."""
from . import cifar10, mnist, tinyimagenet  # noqa: F401  (register the datasets)
from .common import (DATA_DIR_ENV, DATASETS, Augmentation, DataError, Dataset, DatasetInfo, Split, augment_batch,
                     input_spec, iterate_batches, load_data, load_dataset, num_batches, split_validation)

__all__ = ["DATA_DIR_ENV", "DATASETS", "Augmentation", "DataError", "Dataset", "DatasetInfo", "Split", "augment_batch",
           "input_spec", "iterate_batches", "load_data", "load_dataset", "num_batches", "split_validation"]
