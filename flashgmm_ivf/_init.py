"""Initial means: k-means (FAISS), k-means++ or random rows, drawn from a uniform sample.

The sample is taken in one streaming pass (each row gets a uniform random key;
the rows with the smallest keys are kept), so initialisation also works when the
data never fits in memory.
"""
from __future__ import annotations

import faiss
import numpy as np

from ._chunks import ChunkSource

INIT_METHODS = ("kmeans", "k-means++", "random_from_data", "random")
# FAISS trains k-means on at most 256 points per centroid; more adds time, not quality.
POINTS_PER_COMPONENT = 256
SAMPLE_BYTES = 1 << 30


def uniform_sample(source: ChunkSource, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` rows drawn uniformly without replacement (all rows if fewer), as float32."""
    keys = np.empty(0)
    rows = None
    for _, block in source:
        block = np.asarray(block.cpu() if hasattr(block, "cpu") else block, dtype=np.float32)
        block_keys = rng.random(block.shape[0])
        keys = np.concatenate([keys, block_keys])
        rows = block if rows is None else np.concatenate([rows, block])
        if keys.size > size:
            keep = np.argpartition(keys, size)[:size]
            keys, rows = keys[keep], rows[keep]
    # Ordered by key, the sample is the same however the data was chunked.
    return rows[np.argsort(keys, kind="stable")]


def sample_size(n_components: int, n_features: int) -> int:
    return int(min(POINTS_PER_COMPONENT * n_components, max(n_components, SAMPLE_BYTES // (4 * max(1, n_features)))))


def initial_means(sample: np.ndarray, n_components: int, method: str, rng: np.random.Generator) -> np.ndarray:
    """(K, D) float64 seeds from a (m, D) float32 sample."""
    if method == "random_from_data":
        return sample[rng.choice(sample.shape[0], n_components, replace=False)].astype(np.float64)
    if method == "k-means++":
        return _kmeans_plusplus(sample, n_components, rng)
    # min_points_per_centroid=1: FAISS's too-few-points warning (printed, whatever verbose says)
    # is for an IVF's lists; a mixture may have components of a few rows each.
    km = faiss.Kmeans(sample.shape[1], n_components, niter=20, seed=int(rng.integers(2**31 - 1)),
                      max_points_per_centroid=POINTS_PER_COMPONENT, min_points_per_centroid=1, verbose=False)
    # FAISS clusters in float32: centred and scaled to |x| <= 1 (a power of two, exact), the
    # squared distances neither overflow (large values abort FAISS) nor lose the digits the
    # data's offset would take.
    x = sample.astype(np.float64)
    centre = x.mean(0)
    spread = float(np.abs(x - centre).max())
    scale = 2.0 ** np.ceil(np.log2(spread)) if spread > 0 else 1.0
    km.train(np.ascontiguousarray((x - centre) / scale, dtype=np.float32))
    return km.centroids.astype(np.float64) * scale + centre


def _kmeans_plusplus(sample: np.ndarray, n_components: int, rng: np.random.Generator) -> np.ndarray:
    """Arthur & Vassilvitskii's D^2 seeding with 2 + log K local trials per seed (as scikit-learn)."""
    x = sample.astype(np.float64)
    sq = (x * x).sum(1)
    trials = 2 + int(np.log(n_components))
    centers = [x[rng.integers(x.shape[0])]]
    closest = np.maximum(sq - 2 * x @ centers[0] + centers[0] @ centers[0], 0)
    for _ in range(1, n_components):
        total = closest.sum()
        if total <= 0:  # fewer distinct rows than components: any row will do
            cand = rng.integers(x.shape[0], size=trials)
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=x.shape[0] - 1)
        d2 = np.maximum(sq[None, :] - 2 * x[cand] @ x.T + sq[cand, None], 0)
        d2 = np.minimum(closest[None, :], d2)
        best = int(np.argmin(d2.sum(1)))
        centers.append(x[cand[best]])
        closest = d2[best]
    return np.stack(centers)
