"""Shared fixtures. Without a GPU, Triton kernels run in its interpreter (set before triton loads)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not item.keywords: it holds folder names too (a checkout named gpu)
            item.add_marker(skip)


def shared_set(name: str, split: str = "base") -> np.ndarray:
    """A split of ../shared/data/NAME (skips the test when the shared data is absent)."""
    path = SHARED_DATA / name / f"{split}.npy"
    if not path.exists():
        pytest.skip(f"shared data set {path} is absent (see ../shared/data/fetch)")
    return np.load(path, allow_pickle=False)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every torch.empty return NaN (floats) or -7 (integers), so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)
    return empty
