import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist():
    from ctbench.data import load_dataset

    return load_dataset("mnist")
