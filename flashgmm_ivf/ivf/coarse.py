"""Coarse steps over the list means: the FAISS indexes that find a query's nearest lists.

Three kinds, each a real FAISS index that ``faiss.IndexIVF`` uses as its quantizer:

- ``faiss.IndexFlat``: every mean, nlist distances per query.
- ``faiss.IndexHNSWFlat``: a graph walk, the distances it evaluates.
- A projected ranking (:func:`projected_ranker`), a ``faiss.IndexRefine``: every mean ranked in
  a few of the means' principal directions, then the ``k_factor x depth`` best re-ranked by their
  true distances. In high dimension a low-dimensional distance costs a fraction of a full one,
  and the means a graph walk must visit grow with the dimension.

:func:`ranking_cost` says what one ranking costs in distance computations (one per
d-dimensional product, so a product over p < d dimensions counts p / d).
"""
from __future__ import annotations

import math

import faiss
import faiss.contrib.ivf_tools
import numpy as np

__all__ = ["REFINE_FACTOR", "RESIDUAL_WEIGHT", "build", "graph", "install", "means_index", "name_of",
           "projected_ranker", "ranking_cost"]

# Means re-ranked by true distance per list asked for: on GIST-like 960-d and 784-d rows four
# times the depth recovers >= 95% of the exact top 4 lists where twice recovers 85-90%.
REFINE_FACTOR = 4.0
# Weight of a mean's squared residual (its part outside the projection) in its projected
# distance. The full distance is |Pq - Pm|^2 + |r_q|^2 + |r_m|^2 - 2 <r_q, r_m>; the cross term
# is unknown without the full product, and for the mean of a query's own cluster it cancels
# part of |r_m|^2 (their residuals point the same way). Half the weight ranked the exact top
# lists better than 0 or 1 across 256-d text-like and 960-d GIST-like rows.
RESIDUAL_WEIGHT = 0.5


def build(name: str, means: np.ndarray, metric_type: int) -> faiss.Index:
    """The coarse step ``name`` ('flat', 'hnsw<M>' or 'pca<p>') over ``means``."""
    if name == "flat":
        index = faiss.IndexFlat(means.shape[1], metric_type)
        index.add(np.ascontiguousarray(means, dtype=np.float32))
        return index
    if name.startswith("hnsw"):
        return graph(means, int(name[4:]), metric_type)
    if name.startswith("pca"):
        return projected_ranker(means, int(name[3:]), metric_type)
    raise ValueError(f"unknown coarse step {name!r}")


def graph(means: np.ndarray, links: int, metric_type: int) -> faiss.IndexHNSWFlat:
    """An HNSW graph over the means (``faiss.IndexHNSWFlat``, ``links`` per node)."""
    index = faiss.IndexHNSWFlat(means.shape[1], int(links), metric_type)
    index.add(np.ascontiguousarray(means, dtype=np.float32))
    return index


def projected_ranker(means: np.ndarray, dims: int, metric_type: int = faiss.METRIC_L2, *,
                     k_factor: float = REFINE_FACTOR) -> faiss.IndexRefine:
    """Ranking of the means in their ``dims`` principal directions, refined by true distances (or inner products).

    The means' own directions are those that tell lists apart. Directions fitted on the
    calibration queries would also flatter the depth tables fitted on those queries (on
    GIST-like rows: recall@10 0.872 on test queries asked for 0.9, against 0.903).

    Parameters
    ----------
    means : ndarray of shape (nlist, d), float32
    dims : int in [1, d)
    metric_type : faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT
    k_factor : float >= 1, means re-ranked per list asked for

    Returns
    -------
    faiss.IndexRefine whose base is ``IndexPreTransform(LinearTransform(d, dims + 1),
    IndexFlat(dims + 1))`` and whose refine index is an ``IndexFlat`` of the means, both of
    ``metric_type``. Under L2 a mean is stored as its projection P(m - c) (c the means'
    centre) plus one coordinate, sqrt(RESIDUAL_WEIGHT) |r_m| (its residual outside the
    projection); the transform gives a query P(q - c) and 0 there, so the base distance is
    |Pq - Pm|^2 + RESIDUAL_WEIGHT |r_m|^2. Under inner product the query is Pq and the extra
    coordinate 0: <Pq, P(m - c)> ranks as <q, m> does where m - c lies in the projection
    (<q, c> is the same for every mean).
    """
    means = np.ascontiguousarray(means, dtype=np.float32)
    d = means.shape[1]
    if not 1 <= dims < d:
        raise ValueError(f"a projected ranking needs 1 <= dims < d={d}, got {dims}")
    center = means.mean(0, dtype=np.float64)
    centered = means - center
    # Principal directions in float64: raw-scale rows (SIFT's 0..255) keep their small ones.
    _, vectors = np.linalg.eigh(centered.T @ centered)
    basis = vectors[:, ::-1][:, :dims].T  # (dims, d), largest variance first
    projected = centered @ basis.T
    residual = np.maximum((centered ** 2).sum(1) - (projected ** 2).sum(1), 0.0)
    l2 = metric_type == faiss.METRIC_L2
    transform = faiss.LinearTransform(d, dims + 1, True)
    matrix = np.zeros((dims + 1, d), np.float32)
    matrix[:dims] = basis
    faiss.copy_array_to_vector(matrix.ravel(), transform.A)
    shift = -(basis @ center) if l2 else np.zeros(dims)
    faiss.copy_array_to_vector(np.concatenate([shift, [0.0]]).astype(np.float32), transform.b)
    transform.is_trained = True
    flat = faiss.IndexFlat(dims + 1, metric_type)
    extra = np.sqrt(RESIDUAL_WEIGHT * residual) if l2 else np.zeros(len(means))
    flat.add(np.hstack([projected, extra[:, None]]).astype(np.float32))
    base = faiss.IndexPreTransform(transform, flat)
    refine = faiss.IndexFlat(d, metric_type)
    refine.add(means)
    ranker = faiss.IndexRefine(base, refine)
    ranker.k_factor = float(k_factor)
    return ranker


def install(index_ivf: faiss.IndexIVF, quantizer: faiss.Index) -> None:
    """``replace_ivf_quantizer``, keeping a Python reference to the new quantizer only (the replaced one is freed)."""
    faiss.contrib.ivf_tools.replace_ivf_quantizer(index_ivf, quantizer)
    index_ivf.referenced_objects = [quantizer]


def name_of(quantizer: faiss.Index) -> str:
    """A coarse step's name: 'flat', 'hnsw<M>' (links per node) or 'pca<p>' (projected dimensions)."""
    quantizer = faiss.downcast_index(quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        return f"hnsw{quantizer.hnsw.nb_neighbors(1)}"
    if isinstance(quantizer, faiss.IndexRefine):
        return f"pca{faiss.downcast_index(quantizer.base_index).index.d - 1}"
    return "flat"


def means_index(quantizer: faiss.Index) -> faiss.IndexFlat:
    """The flat index of the means inside a coarse step (the step itself when it is flat)."""
    quantizer = faiss.downcast_index(quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        return faiss.downcast_index(quantizer.storage)
    if isinstance(quantizer, faiss.IndexRefine):
        return faiss.downcast_index(quantizer.refine_index)
    return quantizer


def ranking_cost(quantizer: faiss.IndexRefine, depth: int, k_factor: float) -> float:
    """Distance computations of one query's projected ranking ``depth`` deep.

    The projection (dims + 1 products of d dimensions), nlist distances of dims + 1
    dimensions (each (dims + 1) / d of a full one) and the re-ranked means, one each.
    """
    base = faiss.downcast_index(quantizer.base_index)
    projected = base.index.d
    nlist = int(quantizer.ntotal)
    return projected + nlist * projected / quantizer.d + min(nlist, math.floor(depth * k_factor))
