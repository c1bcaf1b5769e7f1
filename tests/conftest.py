"""Shared fixtures. Without a GPU, Triton kernels run in its interpreter (set before triton loads)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based fuzzing (tests/test_fuzz.py): "ci" is the quick default; a long search runs with
# pytest tests/test_fuzz.py --hypothesis-profile=long
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

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


def kmeans_partition(x: np.ndarray, nlist: int, niter: int = 10):
    """FAISS k-means centroids (nlist, d) float32 and every row's nearest one (n,) int64."""
    import faiss
    km = faiss.Kmeans(x.shape[1], nlist, niter=niter, seed=1234)
    km.train(x)
    return km.centroids.copy(), km.index.search(x, 1)[1][:, 0].astype(np.int64)


def ivf_with_lists(centroids: np.ndarray, base: np.ndarray, lists: np.ndarray, coarse: str = "flat"):
    """An IndexIVFFlat over ``centroids`` holding each base row in each of its lists (ids = row numbers).

    ``coarse='hnsw'``: the same lists behind an ``IndexHNSWFlat`` (M 16) over the centroids.
    """
    import faiss
    import faiss.contrib.ivf_tools

    from flashgmm_ivf.ivf.quantizer import add_assigned, new_ivf, set_centroids
    index = new_ivf(base.shape[1], centroids.shape[0], "Flat", "l2")
    set_centroids(index, centroids)
    index.train(centroids)  # the quantizer is full: only marks the index trained
    add_assigned(index, base, lists, np.arange(base.shape[0], dtype=np.int64))
    if coarse == "hnsw":
        faiss.contrib.ivf_tools.replace_ivf_quantizer(index, faiss.IndexHNSWFlat(base.shape[1], 16))
    return index


def rewrite_gmm_file(src, dst, *, header=None, resign=True, **arrays):
    """Copy a GaussianMixture file from ``src`` to ``dst`` with header fields and arrays replaced.

    ``resign=True`` recomputes the SHA-256 as the format documents it (header bytes, then each
    array's name, dtype, shape and bytes), so the load-time checks past the checksum are reached;
    ``resign=False`` keeps the old checksum, as an editor of the file would.
    """
    import hashlib
    import json

    with np.load(src, allow_pickle=False) as npz:
        members = dict(npz)
    fields = json.loads(members["header"].tobytes().decode())
    for key, value in (header or {}).items():
        fields[key] = value
    members.update(arrays, header=np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8))
    if resign:
        raw = members["header"].tobytes()
        h = hashlib.sha256(len(raw).to_bytes(8, "little") + raw)
        for name in ("weights", "means", "covariances"):
            a = np.ascontiguousarray(members[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode() + a.tobytes())
        members["checksum"] = np.array(h.hexdigest())
    with open(dst, "wb") as f:
        np.savez(f, **members)
    return dst
