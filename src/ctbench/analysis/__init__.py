"""The paper's section 5 analyses as pure functions (no printing), one module each:

* ``fragmentation``: unstable-neuron ratio (sampled lower bound, IBP and CROWN-IBP upper bounds);
* ``utilization``: ratio of neurons active on the clean input;
* ``shared_mistakes``: how many runs certify each sample vs independence (Poisson-binomial);
* ``tightness``: propagation tightness (Mao et al. 2024), final and per layer;
* ``corruptions`` / ``ood``: MNIST-C and CIFAR-10-C corruptions, accuracy ratio to clean;
* ``figures``: Figures 3-6 and the Table 2 layout (needs matplotlib, imported lazily).

``corruptions`` needs scipy and scikit-image, ``figures`` matplotlib (the ``analysis`` extra);
both import them only when called.
"""
from .corruptions import (CIFAR10_C, CORRUPTIONS, MNIST_C, CorruptedSet, corrupt, corrupted_test_set,
                          corruption_names, load_published)
from .figures import (ood_heatmap, save_figure, shared_mistakes_figure, tightness_figure,
                      unstable_neurons_figure, utilization_figure)
from .fragmentation import (FragmentationResult, crown_ibp_unstable_masks, ibp_unstable_masks,
                            sampled_unstable_masks, unstable_neurons)
from .ood import OODResult, accuracy, ood_generalization
from .shared_mistakes import SharedMistakes, markdown_table, poisson_binomial, shared_mistakes, two_verifier_table
from .tightness import TightnessResult, propagation_tightness, tightness_rows
from .utilization import UtilizationResult, active_masks, model_utilization

__all__ = [
    "CIFAR10_C", "CORRUPTIONS", "MNIST_C", "CorruptedSet", "FragmentationResult", "OODResult", "SharedMistakes",
    "TightnessResult", "UtilizationResult", "accuracy", "active_masks", "corrupt", "corrupted_test_set",
    "corruption_names", "crown_ibp_unstable_masks", "ibp_unstable_masks", "load_published", "markdown_table",
    "model_utilization", "ood_generalization", "ood_heatmap", "save_figure", "shared_mistakes_figure",
    "tightness_figure", "unstable_neurons_figure", "utilization_figure", "poisson_binomial", "propagation_tightness",
    "sampled_unstable_masks", "shared_mistakes", "tightness_rows", "two_verifier_table", "unstable_neurons",
]
