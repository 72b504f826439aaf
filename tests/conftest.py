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


PARITY_PROMPTS = ["Hi", "What is in this picture? Describe every detail you can see, please.", "Who is this?"]


def parity_images(n: int = 3):
    """Small images of different shapes (dynamic-resolution families get few patches: fast tests)."""
    from PIL import Image

    photo = Image.open(ASSETS / "astronaut.jpg").convert("RGB").resize((192, 128))
    return [photo, photo.transpose(Image.FLIP_LEFT_RIGHT).resize((128, 128)), photo.transpose(Image.ROTATE_90)][:n]


def parity_batch(loaded, n: int = 3) -> dict:
    """n rows of different images and prompt lengths (left-padded): what runtime parity runs on."""
    from vlmrt.processor import Processor

    return Processor(loaded.spec, loaded.tokenizer)(parity_images(n), PARITY_PROMPTS[:n])


def assert_runtime_parity(loaded, runtime, steps: int = 4, rtol: float = 1e-4, n: int = 3) -> None:
    """`runtime` against eager fp32 on `loaded`, tensor by tensor (vlmrt/eval/tensor_parity.py)."""
    from vlmrt.eval.tensor_parity import runtime_parity
    from vlmrt.runtimes.eager import EagerRuntime

    batch = parity_batch(loaded, n)
    runtime_parity(EagerRuntime(loaded), runtime, batch, loaded.tokenizer, steps, rtol).assert_ok(getattr(runtime, "name", "runtime"))
