import sys
from pathlib import Path

import pytest
import torch

# Tests import shared helpers (tiny_models) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny matmuls on a shared 2-core box: extra OpenMP threads only spin and wait."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
