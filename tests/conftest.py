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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronization (badly so on a busy
    machine). Modules that use it (``pytestmark = pytest.mark.usefixtures("one_thread")``) run
    single-threaded; the session's setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
