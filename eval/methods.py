"""The algorithms a recall sweep compares, one small object each (in the spirit of ann-benchmarks' wrappers).

Every algorithm is built from training rows and base rows, then searched at a list of depth
settings; after each search ``last_stats`` holds its cost per query, counted from FAISS's own
counters:

- ``ndis``: codes scanned in the inverted lists (``faiss.cvar.indexIVF_stats.ndis``; copies
  of one vector count once each);
- ``ncoarse``: distances of the coarse step (``nlist`` for a flat quantizer, the distances an
  HNSW quantizer's walks evaluated, ``faiss.cvar.hnsw_stats.ndis``, a projected ranking's count
  from :func:`flashgmm_ivf.ivf.coarse.ranking_cost`), plus whatever a probing rule computes
  beyond them (what our index reports in ``last_stats.ncoarse``).

Three kinds:

- :class:`FaissIVF`: FAISS k-means IVF as a FAISS user builds it,
  ``faiss.index_factory(d, "IVF<nlist>,Flat")`` with k-means at 25 iterations, nprobe swept;
- :class:`FaissIVFHNSW`: FAISS's IVF with an HNSW graph over the centroids,
  ``"IVF<nlist>_HNSW32,Flat"``, nprobe and efSearch swept;
- :class:`GMMIndex`: our index, built only through ``flashgmm_ivf.index_factory(d, spec)``
  for any spec string, searched at recall targets (its calibrated depth) or at nprobe values.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

import flashgmm_ivf

__all__ = ["EF_SEARCH", "RECALL_TARGETS", "Algorithm", "FaissIVF", "FaissIVFHNSW", "GMMIndex", "nprobe_grid"]

# Recall@10 targets asked of an index that calibrates its depth: the knob of its curve.
RECALL_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995)
# efSearch values of an HNSW coarse step; each is one curve over nprobe <= efSearch (a larger
# nprobe makes FAISS walk with efSearch = nprobe, which the next curve measures).
EF_SEARCH = (16, 32, 64, 128, 256, 512)


def nprobe_grid(nlist):
    """nprobe values 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and the midpoints between) up to nlist.

    Costs at a recall target are interpolated between measured points; the midpoints keep
    that interpolation close to the curve, so a fixed-nprobe method is not charged for the
    gaps of its grid.
    """
    grid = sorted({v for i in range(int(np.log2(nlist)) + 1) for v in (1 << i, 3 << i >> 1) if 1 <= v <= nlist})
    return grid + ([nlist] if grid[-1] != nlist else [])


class Algorithm:
    """One method of a sweep.

    Attributes
    ----------
    name : str
        Label in tables and plots.
    yardstick : str or None
        'ivf' or 'ivf-hnsw' for the FAISS references the ratios are taken against, else None.
    last_stats : dict or None
        After ``search``: 'ndis' and 'ncoarse' per query.
    build_s : float
        Seconds ``build`` took (training, adding, calibration).
    """

    yardstick = None

    def __init__(self, name):
        self.name = name
        self.last_stats = None
        self.build_s = None

    def build(self, train, base, learn=None):
        """Train on ``train`` (n_train, d), add ``base`` (n, d) with ids 0..n-1; ``learn`` (nl, d): queries
        an algorithm may calibrate on (None: none given)."""
        raise NotImplementedError

    def curves(self):
        """Depth settings, as a list of curves, each a list of keyword dicts for ``search``, cost increasing."""
        raise NotImplementedError

    def search(self, xq, k, **depth):
        """(D, I) of the k nearest neighbours, FAISS shapes; sets ``last_stats``."""
        raise NotImplementedError

    def copies_per_vector(self) -> float:
        """Entries in the inverted lists per base vector."""
        raise NotImplementedError

    def index_bytes(self) -> int:
        """Size of the index as written to disk."""
        raise NotImplementedError

    def params(self) -> dict:
        """Settings worth recording beside the results."""
        return {}

    def close(self):
        """Free the index (files it wrote stay until ``remove_files``)."""

    def remove_files(self):
        """Delete files the algorithm wrote."""


class FaissIVF(Algorithm):
    """FAISS IVF: ``faiss.index_factory(d, f"IVF{nlist}{coarse},Flat")``, k-means with ``niter`` iterations.

    Parameters
    ----------
    nlist : int
    niter : int, default 25
        k-means iterations (``faiss.Kmeans``' default; ``IndexIVF`` training defaults to 10).
    seed : int
    start_from : FaissIVF, optional
        Built already: take its k-means centroids (the same ``niter`` and ``seed`` give the
        same centroids) instead of running k-means again; ``build_s`` still counts that k-means.
    cache : str or Path, optional
        Folder keeping the trained (empty) index, keyed by nlist, niter, seed, metric and a
        digest of the training rows, so a later sweep of the same set skips the k-means;
        ``build_s`` then counts the k-means seconds recorded when it ran.
    metric : {'l2', 'ip'}, default 'l2'
    """

    yardstick = "ivf"
    coarse = ""

    def __init__(self, nlist, *, niter=25, seed=1234, start_from=None, cache=None, metric="l2", name=None):
        super().__init__(name or f"FAISS IVF{nlist}{self.coarse},Flat")
        self.nlist, self.niter, self.seed, self.start_from = nlist, niter, seed, start_from
        self.metric = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]
        self.cache = None if cache is None else Path(cache)
        self.index = self.centroids = None

    def build(self, train, base, learn=None):
        start = time.perf_counter()
        self.index = faiss.index_factory(base.shape[1], f"IVF{self.nlist}{self.coarse},Flat", self.metric)
        ivf = faiss.extract_index_ivf(self.index)
        ivf.cp.niter, ivf.cp.seed = self.niter, self.seed
        cached = False
        if self.start_from is None:
            cached = self._train(train, start)
            ivf = faiss.extract_index_ivf(self.index)
        else:
            # What IndexIVF.train does for a quantizer that is not flat (quantizer_trains_alone = 2):
            # k-means on a flat index, centroids added to the quantizer; here the k-means already run.
            ivf.quantizer.add(self.start_from.centroids)
            ivf.is_trained = True
            self.kmeans_s = self.start_from.kmeans_s
        self.centroids = ivf.quantizer.reconstruct_n(0, self.nlist)
        self.index.add(base)
        self.build_s = time.perf_counter() - start + (self.kmeans_s if self.start_from is not None or cached else 0.0)

    def _train(self, train, start):
        """k-means (``self.index.train``), or the trained index and its k-means seconds from the cache (-> True)."""
        path = None
        if self.cache is not None:
            sample = np.ascontiguousarray(train[:: max(1, len(train) // 4096)])
            digest = hashlib.sha256(sample.tobytes() + repr(train.shape).encode()).hexdigest()[:16]
            metric = "" if self.metric == faiss.METRIC_L2 else "-ip"
            path = self.cache / (f"faiss-IVF{self.nlist}{self.coarse}{metric}-niter{self.niter}-seed{self.seed}-"
                                 f"{digest}.index")
            if path.exists():
                self.index = faiss.read_index(str(path))
                self.kmeans_s = float(path.with_suffix(".seconds").read_text())
                return True
        self.index.train(train)
        self.kmeans_s = time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            faiss.write_index(self.index, str(path))
            path.with_suffix(".seconds").write_text(f"{self.kmeans_s}\n")
        return False

    def curves(self):
        return [[{"nprobe": p} for p in nprobe_grid(self.nlist)]]

    def search(self, xq, k, nprobe):
        faiss.extract_index_ivf(self.index).nprobe = nprobe
        faiss.cvar.indexIVF_stats.reset()
        D, I = self.index.search(xq, k)
        nq = len(xq)
        self.last_stats = {"ndis": faiss.cvar.indexIVF_stats.ndis / nq, "ncoarse": float(self.nlist)}
        return D, I

    def copies_per_vector(self):
        return 1.0

    def index_bytes(self):
        return int(faiss.serialize_index(self.index).size)

    def params(self):
        out = {"factory": f"IVF{self.nlist}{self.coarse},Flat", "kmeans_niter": self.niter, "seed": self.seed}
        if self.start_from is not None:
            out["kmeans_from"] = self.start_from.name
        return out

    def close(self):
        self.index = None


class FaissIVFHNSW(FaissIVF):
    """FAISS IVF with an HNSW coarse step: ``faiss.index_factory(d, f"IVF{nlist}_HNSW{M},Flat")``.

    The centroids are FAISS's k-means (``niter`` iterations) as for :class:`FaissIVF`; queries
    find their nprobe lists by walking an HNSW graph over them. Swept over nprobe at each
    efSearch of ``ef_search``; the coarse cost is what the walks evaluated
    (``faiss.cvar.hnsw_stats.ndis``).
    """

    yardstick = "ivf-hnsw"

    def __init__(self, nlist, *, M=32, niter=25, seed=1234, ef_search=EF_SEARCH, start_from=None, cache=None,
                 metric="l2", name=None):
        self.coarse = f"_HNSW{M}"
        super().__init__(nlist, niter=niter, seed=seed, start_from=start_from, cache=cache, metric=metric, name=name)
        self.ef_search = tuple(ef_search)

    def curves(self):
        grid = nprobe_grid(self.nlist)
        last = self.ef_search[-1]
        return [[{"nprobe": p, "ef_search": ef} for p in grid if p <= ef or ef == last] for ef in self.ef_search]

    def search(self, xq, k, nprobe, ef_search):
        ivf = faiss.extract_index_ivf(self.index)
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = ef_search
        ivf.nprobe = nprobe
        faiss.cvar.indexIVF_stats.reset()
        faiss.cvar.hnsw_stats.reset()
        D, I = self.index.search(xq, k)
        nq = len(xq)
        self.last_stats = {"ndis": faiss.cvar.indexIVF_stats.ndis / nq, "ncoarse": faiss.cvar.hnsw_stats.ndis / nq}
        return D, I


class GMMIndex(Algorithm):
    """Our index, built through ``flashgmm_ivf.index_factory(d, spec)`` only.

    Parameters
    ----------
    spec : str
        Any description ``index_factory`` takes; ``{nlist}`` is replaced by ``nlist``,
        e.g. ``"IVF{nlist}_GMM,Flat"`` (the default recipe) or
        ``"IVF{nlist}_GMM(partition=kmeans),Flat"``.
    nlist : int
    calibrate : {'train', 'learn'}, default 'train'
        'train': the depth calibration ``train`` makes from training rows alone; 'learn':
        refined afterwards with ``index.calibrate(learn)``.
    knob : {'recall', 'nprobe'}, default 'recall'
        What is swept: recall targets (``search(..., recall=r)``, ``RECALL_TARGETS``: the
        calibrated depth users get) or nprobe (``search(..., nprobe=p)``).
    start_from : GMMIndex, optional
        Built already: read its written file (``flashgmm_ivf.read_index``) instead of
        training again (e.g. the same index before and after ``calibrate``).
    name : str, optional
    **options
        Keyword options of ``index_factory``.
    """

    def __init__(self, spec, nlist, *, calibrate="train", knob="recall", start_from=None, name=None, **options):
        if calibrate not in ("train", "learn"):
            raise ValueError(f"calibrate must be 'train' or 'learn', got {calibrate!r}")
        if knob not in ("recall", "nprobe"):
            raise ValueError(f"knob must be 'recall' or 'nprobe', got {knob!r}")
        self.spec = spec.replace("{nlist}", str(nlist))
        super().__init__(name or self.spec + (" + calibrate(learn)" if calibrate == "learn" else ""))
        self.nlist, self.calibrate, self.knob, self.options = nlist, calibrate, knob, options
        self.start_from = start_from
        self.index = self.path = None
        self.calibration_info = {}

    def build(self, train, base, learn=None):
        if self.calibrate == "learn" and learn is None:
            raise ValueError(f"{self.name}: calibrate='learn' needs learn queries, and none were given")
        start = time.perf_counter()
        if self.start_from is not None:
            self.index = flashgmm_ivf.read_index(self.start_from.path)
        else:
            self.index = flashgmm_ivf.index_factory(base.shape[1], self.spec, **self.options)
            self.index.train(train)
            self.index.add(base)
        if self.calibrate == "learn":
            self.index.calibrate(learn)
            self.calibration_info = {"learn_queries": int(len(learn))}
        if self.knob == "recall":  # the index fits its depth table at the first such search: part of the build
            self.index.search(base[:1], 1, recall=RECALL_TARGETS[0])
        self.build_s = time.perf_counter() - start
        handle, self.path = tempfile.mkstemp(suffix=".npz", prefix="flashgmm-eval-")
        os.close(handle)
        flashgmm_ivf.write_index(self.index, self.path)

    def curves(self):
        if self.knob == "recall":
            return [[{"recall": r} for r in RECALL_TARGETS]]
        return [[{"nprobe": p} for p in nprobe_grid(self.nlist)]]

    def search(self, xq, k, **depth):
        D, I = self.index.search(xq, k, **depth)
        stats = self.index.last_stats
        self.last_stats = {"ndis": stats.ndis / stats.nq, "ncoarse": stats.ncoarse / stats.nq}
        return D, I

    def copies_per_vector(self):
        return self.index.index.ntotal / self.index.ntotal

    def index_bytes(self):
        return os.path.getsize(self.path)

    def params(self):
        out = {"spec": self.spec, "calibrate": self.calibrate, "knob": self.knob, **self.options,
               **self.calibration_info}
        out["settings"] = self.index.settings()  # the recipe the spec resolved to
        out["coarse_step"] = self.index.coarse_step  # the coarse step 'auto' chose
        if getattr(self.index, "hnsw_ef_search", None) is not None:
            out["hnsw_ef_search"] = self.index.hnsw_ef_search
            out["hnsw_links"] = int(self.index.quantizer_index.hnsw.nb_neighbors(1))  # M of the graph used
        return out

    def close(self):
        self.index = None

    def remove_files(self):
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)
        self.path = None
