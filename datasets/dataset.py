"""The ``Dataset`` record: base vectors, queries, training sample and ground truth."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from .arrays import check_matrix
from .groundtruth import ground_truth
from .metric import check_metric, normalize_rows


@dataclass(frozen=True)
class Dataset:
    """A nearest-neighbour benchmark set.

    Arrays may be memory maps or ``h5py.Dataset`` objects: nothing is loaded until it is
    indexed, except by ``subset(seed=...)`` and ``to_l2()``, which say so.

    Attributes
    ----------
    name : str
    metric : {'l2', 'angular', 'ip'}
        ``'angular'`` is cosine similarity; see ``to_l2``.
    base : array-like, shape (n, d)
        Vectors to index.
    test : array-like, shape (nq, d)
        Queries.
    learn : array-like, shape (nl, d), or None
        Training sample disjoint from the queries, for fitting quantizers.
    gt : array-like, shape (nq, k), or None
        Ids of each query's exact nearest base rows, nearest first.
    meta : Mapping
        Provenance (the set's ``meta.json`` where there is one).
    """

    name: str
    metric: str
    base: Any
    test: Any
    learn: Any = None
    gt: Any = None
    meta: Mapping = field(default_factory=dict)

    def __post_init__(self):
        check_metric(self.metric)
        _, d = check_matrix(self.base, f"{self.name}.base")
        for part in ("test", "learn"):
            array = getattr(self, part)
            if array is not None and check_matrix(array, f"{self.name}.{part}")[1] != d:
                raise ValueError(f"{self.name}: {part} has d={array.shape[1]} but base has d={d}")
        if self.gt is not None:
            nq, _ = check_matrix(self.gt, f"{self.name}.gt")
            if nq != self.test.shape[0]:
                raise ValueError(f"{self.name}: gt has {nq} rows but test has {self.test.shape[0]}")
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return int(self.base.shape[1])

    def ground_truth(self, k: int = 100, cache_dir=None) -> np.ndarray:
        """Ids of the k exact nearest base rows of each query.

        Parameters
        ----------
        k : int
        cache_dir : str or Path or None
            Where computed ground truth is cached (see ``groundtruth.ground_truth``).

        Returns
        -------
        np.ndarray, shape (nq, k), integer
            The stored ``gt`` when it has at least k columns, else computed with faiss.
        """
        if self.gt is not None and self.gt.shape[1] >= k:
            return np.asarray(self.gt[:, :k])
        return ground_truth(self.base, self.test, k, self.metric, cache_dir=cache_dir)

    def subset(self, n: int, *, seed: int | None = None) -> Dataset:
        """The same set with only n base rows.

        Parameters
        ----------
        n : int
            Base rows to keep, ``1 <= n <= len(base)``.
        seed : int or None
            None: the first n rows (stays lazy).  An int: n distinct rows drawn with
            ``np.random.default_rng(seed)``, kept in file order and read into memory.

        Returns
        -------
        Dataset
            ``gt`` is dropped (it indexes the full base); ``ground_truth()`` recomputes it.
        """
        total = self.base.shape[0]
        if not 1 <= n <= total:
            raise ValueError(f"{self.name}: subset size must be in 1..{total}, got {n}")
        if seed is None:
            return replace(self, name=f"{self.name}-first{n}", base=self.base[:n], gt=None)
        # Sorted ids read the file front to back (and h5py needs increasing indices).
        rows = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
        return replace(self, name=f"{self.name}-random{n}-seed{seed}",
                       base=np.asarray(self.base[rows]), gt=None)

    def to_l2(self) -> Dataset:
        """The set in a form where L2 distance ranks neighbours as the set's metric does.

        ``'l2'`` sets are returned unchanged.  ``'angular'`` sets get every row scaled to
        unit norm (float32, read into memory): on unit vectors
        ``||a - b||^2 = 2 - 2 cos(a, b)``, so L2 order is cosine order and ``gt`` stays
        valid.  ``'ip'`` (maximum inner product) has no such reduction and raises.

        Returns
        -------
        Dataset
        """
        if self.metric == "l2":
            return self
        if self.metric == "ip":
            raise ValueError(f"{self.name}: inner-product search does not reduce to L2 by "
                             "normalising rows")
        return replace(self, metric="l2", base=normalize_rows(self.base),
                       test=normalize_rows(self.test),
                       learn=None if self.learn is None else normalize_rows(self.learn))
