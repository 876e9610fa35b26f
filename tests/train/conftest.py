"""Fixtures for the training tests: a tiny weights folder (tests/conftest.py) and a 6-image plain-layout
dataset cut from scikit-image's photographs (train_fixtures.py)."""
import pytest
import torch
from train_fixtures import write_iharmony_dataset, write_plain_dataset


@pytest.fixture(scope="session")
def plain_dataset(tmp_path_factory):
    return write_plain_dataset(tmp_path_factory.mktemp("plain") / "data")


@pytest.fixture(scope="session")
def iharmony_dataset(tmp_path_factory):
    return write_iharmony_dataset(tmp_path_factory.mktemp("iharmony") / "data")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a 2-core machine the tiny UNets train far faster single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
