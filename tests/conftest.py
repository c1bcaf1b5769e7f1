"""Shared fixtures. Without a GPU, Triton kernels run in its interpreter (set before triton loads)."""
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from faiss.contrib.ivf_tools import replace_ivf_quantizer

from flashgmm_ivf.ivf.quantizer import add_assigned, new_ivf, set_centroids

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
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


def kmeans_lists(base, nlist, *, niter=10, seed=1234):
    """FAISS k-means centroids (nlist, d) of ``base`` and each row's nearest one (n,), for building test indexes."""
    km = faiss.Kmeans(base.shape[1], nlist, niter=niter, seed=seed)
    km.train(base)
    return km.centroids.copy(), km.index.search(base, 1)[1][:, 0].astype(np.int64)


def ivf_from_lists(centroids, base, lists, quantizer="flat"):
    """An IndexIVFFlat over ``centroids`` holding base row i (id i) in each list of ``lists[i]`` (-1: none).

    ``quantizer='hnsw'``: the lists are found through an ``IndexHNSWFlat`` (M = 16) over the same centroids.
    """
    index = new_ivf(base.shape[1], centroids.shape[0], "Flat", "l2")
    set_centroids(index, centroids)
    index.train(centroids)  # the quantizer is full: only marks the index trained
    add_assigned(index, base, lists, np.arange(base.shape[0], dtype=np.int64))
    if quantizer == "hnsw":
        replace_ivf_quantizer(index, faiss.IndexHNSWFlat(base.shape[1], 16))
    return index
