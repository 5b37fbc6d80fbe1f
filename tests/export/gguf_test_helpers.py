"""Shared by the GGUF export tests."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Block quantisation is many small elementwise ops: on a shared 2-core machine intra-op threads only
    contend (10x slower measured); one thread keeps these tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
