import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing local file must fail at once, never wait on a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "vlmrt" / "assets"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photo() -> Path:
    return ASSETS / "astronaut.jpg"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_LOADED = {}


def load_tiny(preset: str, dtype: str = "fp32"):
    """Tiny presets are loaded once per session (they are read-only in tests)."""
    from vlmrt.models import load_model

    key = (preset, dtype)
    if key not in _LOADED:
        _LOADED[key] = load_model(preset, dtype=dtype)
    return _LOADED[key]
