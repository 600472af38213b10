import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entry or recompile budget leaks between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_configure(config):
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
