"""GMMIndexIVF: a FAISS IndexIVF whose coarse quantizer is a Gaussian mixture.

A drop-in for FAISS IVF code: the same verbs (``train``, ``add``, ``add_with_ids``,
``search``, ``nprobe``, ``ntotal``, ``d``), built from a factory string by changing one
line::

    index = faiss.index_factory(d, "IVF1024,Flat")                  # before
    index = flashgmm_ivf.index_factory(d, "IVF1024_GMM(diag),Flat")  # after

Nothing hides the FAISS index: ``.index`` is the real ``faiss.IndexIVFFlat`` /
``IndexIVFPQ`` / ``IndexIVFScalarQuantizer`` (its quantizer an ``IndexFlatL2`` /
``IndexFlatIP`` holding the GMM means) and ``.gmm`` the fitted ``GaussianMixture``.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import faiss
import numpy as np

from .._validation import check_positive_int
from ..mixture import GaussianMixture
from .quantizer import METRICS, add_assigned, coarse_distances, new_ivf, parse_metric, posterior_lists, set_centroids
from .soft_assign import SoftAssignment, assign_budget, assign_tau, top_components

__all__ = ["GMMIndexIVF", "SearchStats", "index_factory", "dedup_results", "search_dedup", "PROBES"]

PROBES = ("centroid", "posterior")
# Accepted spellings of the two probing modes ('l2' / 'ip' name the quantizer's metric).
_PROBE_ALIASES = {"centroid": "centroid", "l2": "centroid", "ip": "centroid", "distance": "centroid",
                  "posterior": "posterior", "gmm": "posterior"}
# GaussianMixture arguments the index sets unless told otherwise. reg_covar is scaled to
# the data at train time (see GMMIndexIVF.train). An absolute 1e-6 lets a component whose
# pixels are all 0 get variance 1e-6; one non-zero pixel then costs ~1e10 nats, beyond
# float32's resolution of the log-likelihoods that rank lists. Measured (diag, K=256,
# 20 EM iterations, hard assignment, recall@10 at nprobe 8 by posterior / by L2):
# fashion-mnist-784-small 1e-6: 0.89 / 0.60 with lists so unbalanced that scans cost 5-10x;
# 1e-3 x mean variance: 0.79 / 0.96; 1e-2: 0.86 / 0.97; 1e-1: 0.96 / 0.98 (k-means 0.98).
# glove-6B-50d-small (nprobe 16): 1e-6 .. 1e-2 x: 0.82 / 0.85; 1e-1 x: 0.86 / 0.88.
_GMM_DEFAULTS = {"random_state": 1234, "reg_covar": "auto"}
REG_COVAR_AUTO = 1e-1  # 'auto': reg_covar = this * mean per-feature variance of the training rows
_PAD = np.finfo(np.float32).max  # FAISS's distance for a missing result (+ for L2, - for IP)


@dataclass
class SearchStats:
    """Cost of one ``search`` call.

    Attributes
    ----------
    nq : int
        Queries.
    nprobe : int
    probe : {'centroid', 'posterior'}
    ndis : int
        Codes scanned in the inverted lists (``faiss.cvar.indexIVF_stats.ndis``),
        duplicates (copies of one vector) included, re-fetches included.
    ncoarse : int
        Coarse-step evaluations: K centroid distances (probe 'centroid') or K Gaussian
        log-densities plus nprobe true distances to the chosen means (probe 'posterior')
        per query.
    n_refetch : int
        Queries searched again with a larger over-fetch because duplicates crowded out
        unique ids (only when one id was added more than ``max_copies`` times).
    """

    nq: int
    nprobe: int
    probe: str
    ndis: int
    ncoarse: int
    n_refetch: int = 0

    @property
    def total(self) -> int:
        """Distance computations: ``ndis + ncoarse``."""
        return self.ndis + self.ncoarse

    @property
    def per_query(self) -> float:
        """Distance computations per query."""
        return self.total / self.nq if self.nq else 0.0


class GMMIndexIVF:
    """FAISS IVF index whose lists are the components of a Gaussian mixture.

    Parameters
    ----------
    d : int
        Vector dimension.
    nlist : int
        Lists = mixture components K.
    encoding : str, default 'Flat'
        FAISS encoding of the list entries: 'Flat', 'PQ<M>[x<nbits>]', 'SQ8', 'SQ4', 'SQfp16', ...
    metric : {'l2', 'ip', 'cosine'} or faiss.METRIC_L2 / METRIC_INNER_PRODUCT, default 'l2'
        'cosine' is inner product on L2-normalised rows: vectors and queries are
        normalised (copies) before the GMM and FAISS see them, and the GMM is fitted on
        normalised rows. The quantizer is an IndexFlatIP of the raw (not re-normalised)
        means, so residuals are ``x - mu_k`` as FAISS computes them.
    probe : {'centroid', 'posterior'}, default 'centroid'
        How queries pick their nprobe lists. 'centroid' (aliases 'l2', 'ip') is plain
        FAISS search: the quantizer ranks means by the index metric (squared L2, or
        inner product <q, mu_k> for 'ip' / 'cosine'; for unit queries the latter differs
        from L2 ranking by the |mu_k|^2 / 2 term, since GMM means of unit data are
        shorter than 1 by different amounts). 'posterior' (alias 'gmm') ranks lists by
        log pi_k + log N(q | mu_k, Sigma_k) and calls ``search_preassigned`` with the
        true distances to those means.
    nprobe : int, default 1
    tau : float or None
        Soft assignment, threshold policy: a vector also goes to every list j with
        responsibility r_j >= tau (at ``temperature``). Default (tau and copies None): 1/K.
    copies : float or None
        Soft assignment, budget policy: the mean lists per vector of each ``add`` call
        (e.g. 1.5), by a threshold on log-responsibility gaps. Excludes ``tau``.
    max_copies : int, default 4
        Most lists per vector (1 = hard assignment).
    temperature : float, default 1.0
        Posterior temperature T of the threshold policy (r_j ∝ exp(ll_j / T)).
    gmm : GaussianMixture, optional
        Use this mixture (fitted: ``train`` keeps it and only trains the encoder;
        unfitted: ``train`` fits it). Its n_components must equal nlist.
    **gmm_params
        GaussianMixture arguments (covariance_type, max_iter, tol, reg_covar,
        random_state, device, chunk_size, compute_dtype, ...). Defaults differ from
        GaussianMixture's in two places: random_state=1234, and reg_covar='auto' (0.1 x
        the mean per-feature variance of the training rows, so the variance floor
        follows the data's scale; a number is used as is).

    Attributes
    ----------
    index : faiss.IndexIVFFlat, IndexIVFPQ or IndexIVFScalarQuantizer
        The real FAISS index. ``faiss.write_index(gmm_index.index, path)`` gives a file
        that plain FAISS reads and searches with L2/IP probing; vectors stored in
        several lists then appear once per copy, i.e. as repeated ids in a result row
        (plain FAISS never deduplicates). Its ``ntotal`` counts copies.
    gmm : GaussianMixture
    last_stats : SearchStats or None
        Cost of the last search.
    last_assignment : SoftAssignment or None
        Lists of the rows of the last ``add`` call.

    Notes
    -----
    Search deduplicates by id: it over-fetches ``k * max_copies`` results (enough when
    no id was added more than ``max_copies`` times; otherwise short rows are fetched
    again with a doubled count), keeps each id's first (best) occurrence and returns
    exactly k unique ids, padded with -1 (distance +/-3.4e38, as FAISS) only when the
    probed lists hold fewer. With Flat encoding all copies of a vector have the same
    exact distance; with PQ/SQ each copy is encoded against its own mean and the best
    of the copies' estimates is returned.

    Counters (``last_stats``) use FAISS's global ``indexIVF_stats``: concurrent searches
    from several Python threads mix their counts.
    """

    def __init__(self, d, nlist, encoding="Flat", metric="l2", *, probe="centroid", nprobe=1, tau=None,
                 copies=None, max_copies=4, temperature=1.0, gmm=None, **gmm_params):
        self._d = check_positive_int(d, "d")
        self._nlist = check_positive_int(nlist, "nlist")
        self.encoding = str(encoding)
        self.metric = parse_metric(metric)
        self.index = new_ivf(self._d, self._nlist, self.encoding, self.metric)
        self.probe = probe
        self.nprobe = nprobe
        self.set_assignment(tau=tau, copies=copies, max_copies=max_copies, temperature=temperature)
        if gmm is None:
            gmm = GaussianMixture(self._nlist, **{**_GMM_DEFAULTS, **gmm_params})
        elif gmm_params:
            raise ValueError(f"give GaussianMixture arguments either through gmm= or as keywords, not both "
                             f"(got gmm and {sorted(gmm_params)})")
        if not isinstance(gmm, GaussianMixture):
            raise TypeError(f"gmm must be a flashgmm_ivf.GaussianMixture, got {type(gmm).__name__}")
        if gmm.n_components != self._nlist:
            raise ValueError(f"gmm has n_components={gmm.n_components}, but nlist={self._nlist}")
        self.gmm = gmm
        self._ntotal = 0
        self._next_id = 0
        self.last_stats = None
        self.last_assignment = None
        # Most copies any id may have in the FAISS index: sizes the search over-fetch.
        self._max_dup = 1

    # ------------------------------------------------------------------ FAISS-like properties
    @property
    def d(self) -> int:
        return self._d

    @property
    def nlist(self) -> int:
        return self._nlist

    @property
    def ntotal(self) -> int:
        """Vectors added (each counted once, whatever its copies)."""
        return self._ntotal

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained) and hasattr(self.gmm, "means_")

    @property
    def metric_type(self) -> int:
        """faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT."""
        return self.index.metric_type

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value):
        self._nprobe = _check_nprobe(value, self._nlist)
        self.index.nprobe = self._nprobe  # the inner index, used alone, probes the same

    @property
    def probe(self) -> str:
        return self._probe

    @probe.setter
    def probe(self, value):
        self._probe = _check_probe(value)

    @property
    def copies_per_vector(self) -> float:
        """Entries in the FAISS index per vector added."""
        return self.index.ntotal / self._ntotal if self._ntotal else 0.0

    def set_assignment(self, *, tau=None, copies=None, max_copies=4, temperature=1.0):
        """Change the soft-assignment policy of later ``add`` calls (see the class parameters)."""
        if tau is not None and copies is not None:
            raise ValueError("give either tau (threshold policy) or copies (budget policy), not both")
        max_copies = check_positive_int(max_copies, "max_copies")
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= tau <= 1):
            raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
        if copies is not None and (isinstance(copies, bool) or not isinstance(copies, numbers.Real)
                                   or not 1 <= copies <= min(max_copies, self._nlist)):
            raise ValueError(f"copies must be a number in [1, min(max_copies, nlist) = "
                             f"{min(max_copies, self._nlist)}], got {copies!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.tau = None if tau is None else float(tau)
        self.copies = None if copies is None else float(copies)
        self.max_copies = max_copies
        self.temperature = float(temperature)

    # ------------------------------------------------------------------ verbs
    def train(self, x):
        """Fit the GMM on x (unless it is fitted already), install its means, train the encoder.

        Parameters
        ----------
        x : array-like of shape (n, d), n >= nlist
        """
        x = self._vectors(x, "x")
        if not hasattr(self.gmm, "means_"):
            if self.gmm.reg_covar == "auto":
                # Variance floor relative to the data's scale (see _GMM_DEFAULTS).
                # (on a strided sample of <= 65536 rows: a float64 copy of x may not fit)
                sample = x[:: max(1, x.shape[0] // 65536)].astype(np.float64)
                scale = float(sample.var(0).mean()) if sample.shape[0] > 1 else 0.0
                self.gmm.reg_covar = REG_COVAR_AUTO * scale if scale > 0 else 1e-6
            self.gmm.fit(x)
        if self.gmm.means_.shape != (self._nlist, self._d):
            raise ValueError(f"gmm means have shape {self.gmm.means_.shape}, expected ({self._nlist}, {self._d})")
        self.index.reset()
        set_centroids(self.index, self.gmm.means_)
        # The quantizer is full, so IndexIVF.train skips k-means and trains only the
        # encoder (PQ / SQ on residuals; nothing for Flat).
        self.index.train(x)
        self._ntotal, self._next_id, self._max_dup = 0, 0, 1

    def add(self, x):
        """Add vectors with ids ntotal, ntotal + 1, ... (as FAISS), each to its soft-assigned lists.

        Parameters
        ----------
        x : array-like of shape (n, d)
        """
        x = self._vectors(x, "x")
        self._add(x, np.arange(self._next_id, self._next_id + x.shape[0], dtype=np.int64))

    def add_with_ids(self, x, ids):
        """Add vectors with user ids (int64 >= 0), each to its soft-assigned lists.

        Parameters
        ----------
        x : array-like of shape (n, d)
        ids : array-like of shape (n,), integers >= 0
            Search deduplicates by id: give distinct vectors distinct ids.
        """
        x = self._vectors(x, "x")
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.shape != (x.shape[0],):
            raise ValueError(f"ids must have shape ({x.shape[0]},) to match x, got {ids.shape}")
        ids = ids.astype(np.int64)
        if (ids < 0).any():
            bad = np.flatnonzero(ids < 0)
            raise ValueError(f"ids must be >= 0 (-1 marks missing results): {bad.size} negative, first at "
                             f"position {int(bad[0])}")
        self._add(x, ids)

    def _add(self, x, ids):
        self._check_trained("add")
        if x.shape[0] == 0:
            return
        assignment = self.assign(x, normalised=True)
        add_assigned(self.index, x, assignment.lists, ids)
        self.last_assignment = assignment
        self._max_dup = max(self._max_dup, assignment.lists.shape[1])
        self._ntotal += x.shape[0]
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    def assign(self, x, *, normalised=False) -> SoftAssignment:
        """The lists each row of x would be added to (without adding).

        Parameters
        ----------
        x : array-like of shape (n, d)

        Returns
        -------
        SoftAssignment; ``.lists`` of shape (n, min(max_copies, nlist)), -1 = no copy.
        """
        self._check_trained("assign")
        if not normalised:
            x = self._vectors(x, "x")
        top = top_components(self.gmm, x, self.max_copies, temperature=self.temperature)
        return assign_budget(top, self.copies) if self.copies is not None else assign_tau(top, self.tau)

    def search(self, x, k, *, nprobe=None, probe=None):
        """k nearest neighbours with distinct ids.

        Parameters
        ----------
        x : array-like of shape (nq, d)
        k : int >= 1
        nprobe : int in [1, nlist], optional
            Overrides ``self.nprobe`` for this call.
        probe : {'centroid', 'posterior'}, optional
            Overrides ``self.probe`` for this call.

        Returns
        -------
        D : ndarray of shape (nq, k), float32
            Squared L2 distances (ascending) or inner products (descending).
        I : ndarray of shape (nq, k), int64
            Distinct ids per row; -1 (with distance +/-3.4e38) only when the probed
            lists hold fewer than k distinct ids.
        """
        self._check_trained("search")
        if self._ntotal == 0:
            raise ValueError("the index is empty: add vectors before search")
        x = self._vectors(x, "x")
        k = check_positive_int(k, "k")
        nprobe = self._nprobe if nprobe is None else _check_nprobe(nprobe, self._nlist)
        probe = self._probe if probe is None else _check_probe(probe)
        nq = x.shape[0]
        if nq == 0:
            self.last_stats = SearchStats(0, nprobe, probe, 0, 0)
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        lists = coarse = None
        ncoarse = nq * self._nlist
        if probe == "posterior":
            lists = posterior_lists(self.gmm, x, nprobe)
            coarse = coarse_distances(self.index, x, lists)
            ncoarse += nq * nprobe
        D, I, ndis, n_refetch = search_dedup(self.index, x, k, nprobe, self._max_dup, lists, coarse)
        self.last_stats = SearchStats(nq, nprobe, probe, ndis, ncoarse, n_refetch)
        return D, I

    def reset(self):
        """Remove all vectors; training (GMM, centroids, encoder) is kept."""
        self.index.reset()
        self._ntotal, self._next_id, self._max_dup = 0, 0, 1
        self.last_assignment = None

    def memory_usage(self) -> dict:
        """Bytes held, by part.

        Returns
        -------
        dict with n_vectors, n_entries (copies included), copies_per_vector, code_bytes
        (entries x code_size), id_bytes (entries x 8), centroid_bytes (the quantizer),
        gmm_bytes (weights and covariances, float64; used by posterior probing and
        assignment), total_bytes.
        """
        entries = int(self.index.ntotal)
        code = entries * int(self.index.code_size)
        ids = entries * 8
        centroids = self._nlist * self._d * 4
        gmm = 0
        if hasattr(self.gmm, "means_"):
            gmm = self.gmm.weights_.nbytes + self.gmm.covariances_.nbytes
        return {"n_vectors": self._ntotal, "n_entries": entries, "copies_per_vector": self.copies_per_vector,
                "code_bytes": code, "id_bytes": ids, "centroid_bytes": centroids, "gmm_bytes": gmm,
                "total_bytes": code + ids + centroids + gmm}

    def __repr__(self):
        policy = f"copies={self.copies}" if self.copies is not None else \
            f"tau={'1/K' if self.tau is None else self.tau}"
        return (f"GMMIndexIVF(d={self._d}, nlist={self._nlist}, encoding={self.encoding!r}, metric={self.metric!r}, "
                f"covariance_type={self.gmm.covariance_type!r}, {policy}, max_copies={self.max_copies}, "
                f"probe={self._probe!r}, nprobe={self._nprobe}, ntotal={self._ntotal})")

    # ------------------------------------------------------------------ helpers
    def _check_trained(self, what):
        if not self.is_trained:
            raise ValueError(f"the index is not trained: call train before {what}")

    def _vectors(self, x, name):
        """x as C-contiguous float32 (n, d), finite, normalised for 'cosine'."""
        if hasattr(x, "detach"):  # torch tensors
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
        if x.shape[1] != self._d:
            raise ValueError(f"{name} has dimension {x.shape[1]}, but the index has d={self._d}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x).all(1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"{name} contains {bad.size} row(s) with NaN or infinity; the first is row {int(bad[0])}")
        if METRICS[self.metric][1]:
            norms = np.linalg.norm(x, axis=1)
            if (norms == 0).any():
                bad = np.flatnonzero(norms == 0)
                raise ValueError(f"{name} has {bad.size} zero row(s) (no direction for metric 'cosine'); "
                                 f"the first is row {int(bad[0])}")
            x = x.copy()
            faiss.normalize_L2(x)
        return x


def dedup_results(D, I, k, metric_type=faiss.METRIC_L2):
    """Keep the first (best) occurrence of every id, then the first k per row.

    Parameters
    ----------
    D : ndarray of shape (n, kk), float32, each row best first (FAISS order)
    I : ndarray of shape (n, kk), int64, -1 = no result
    k : int
    metric_type : faiss metric, chooses the padding distance (+max for L2, -max for IP)

    Returns
    -------
    D : ndarray of shape (n, k)
    I : ndarray of shape (n, k), distinct ids per row, -1 padded
    count : ndarray of shape (n,), distinct ids found per row (<= k)
    """
    n, kk = I.shape
    order = np.argsort(I, axis=1, kind="stable")  # equal ids together, best (earliest) first
    sorted_ids = np.take_along_axis(I, order, 1)
    first = np.ones((n, kk), dtype=bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    keep = np.empty_like(first)
    np.put_along_axis(keep, order, first, 1)
    keep &= I >= 0
    if kk < k:  # fewer slots than asked for: pad the slots themselves
        pad_cols = k - kk
        D = np.hstack([D, np.zeros((n, pad_cols), D.dtype)])
        I = np.hstack([I, np.full((n, pad_cols), -1, I.dtype)])
        keep = np.hstack([keep, np.zeros((n, pad_cols), bool)])
    pos = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept slots first, in distance order
    count = np.minimum(keep.sum(1), k)
    Dk = np.take_along_axis(D, pos, 1)
    Ik = np.take_along_axis(I, pos, 1)
    missing = np.arange(k)[None, :] >= count[:, None]
    Ik[missing] = -1
    Dk[missing] = _PAD if metric_type == faiss.METRIC_L2 else -_PAD
    return Dk, Ik, count


def search_dedup(index_ivf, x, k, nprobe, max_dup=1, list_nos=None, coarse_dis=None):
    """k nearest distinct ids from a FAISS IVF index whose vectors may sit in several lists.

    Over-fetches ``k * max_dup`` results, keeps each id's first (best) occurrence, and
    fetches rows again with twice the slots while duplicates crowded out unique ids.

    Parameters
    ----------
    index_ivf : faiss.IndexIVF
    x : ndarray of shape (nq, d), float32, C-contiguous
    k : int
    nprobe : int
    max_dup : int
        Most lists any id was added to (sizes the over-fetch; a larger true count only
        costs re-fetches).
    list_nos : ndarray of shape (nq, nprobe), int64, optional
        Lists to probe (``search_preassigned``); None: the index's quantizer picks them.
    coarse_dis : ndarray of shape (nq, nprobe), float32, optional
        True distances to the means of ``list_nos`` (required with it).

    Returns
    -------
    D : ndarray of shape (nq, k), float32
    I : ndarray of shape (nq, k), int64, distinct ids per row, -1 padded
    ndis : int
        Codes scanned (``faiss.cvar.indexIVF_stats.ndis``), duplicates and re-fetches included;
        the coarse step is not counted.
    n_refetch : int
        Query rows fetched again.
    """
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if list_nos is None:
        def fetch(rows, kk):
            return index_ivf.search(x[rows], kk, params=params)
    else:
        def fetch(rows, kk):
            return _search_preassigned(index_ivf, x[rows], kk, list_nos[rows], coarse_dis[rows], params)
    faiss.cvar.indexIVF_stats.reset()
    entries = int(index_ivf.ntotal)
    kk = min(k * max_dup, max(k, entries))
    rows = np.arange(x.shape[0])
    raw_d, raw_i = fetch(rows, kk)
    D, I, count = dedup_results(raw_d, raw_i, k, index_ivf.metric_type)
    # Short rows whose kk slots were all filled (no -1): duplicates crowded out unique
    # ids and the lists hold more, so fetch those rows again with twice the slots.
    short = rows[(count < k) & (raw_i[:, -1] >= 0)]
    n_refetch = 0
    while short.size and kk < entries:
        kk = min(2 * kk, entries)
        raw_d, raw_i = fetch(short, kk)
        d_s, i_s, c_s = dedup_results(raw_d, raw_i, k, index_ivf.metric_type)
        D[short], I[short], count[short] = d_s, i_s, c_s
        n_refetch += short.size
        short = short[(c_s < k) & (raw_i[:, -1] >= 0)]
    return D, I, int(faiss.cvar.indexIVF_stats.ndis), n_refetch


def _search_preassigned(index_ivf, x, k, list_nos, coarse_dis, params):
    """``IndexIVF.search_preassigned`` with per-call nprobe (the contrib wrapper asserts index.nprobe)."""
    n = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    list_nos = np.ascontiguousarray(list_nos, dtype=np.int64)
    coarse_dis = np.ascontiguousarray(coarse_dis, dtype=np.float32)
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=np.int64)
    index_ivf.search_preassigned_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(list_nos), faiss.swig_ptr(coarse_dis),
                                   faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
    return D, I


# ---------------------------------------------------------------------- factory
_FACTORY = re.compile(r"^\s*IVF(\d+)_GMM(?:\(([^()]*)\))?\s*,\s*(\S.*?)\s*$")
_COVARIANCE = ("diag", "spherical", "full")
# Option names in the string -> keyword of GMMIndexIVF / GaussianMixture, and a parser.
_OPTIONS = {
    "tau": ("tau", float), "copies": ("copies", float), "budget": ("copies", float),
    "max_copies": ("max_copies", int), "T": ("temperature", float), "temperature": ("temperature", float),
    "probe": ("probe", str), "nprobe": ("nprobe", int),
    "iter": ("max_iter", int), "niter": ("max_iter", int), "max_iter": ("max_iter", int),
    "tol": ("tol", float), "reg_covar": ("reg_covar", lambda v: v if v == "auto" else float(v)),
    "seed": ("random_state", int), "random_state": ("random_state", int),
    "init": ("init_params", str), "device": ("device", str), "compute_dtype": ("compute_dtype", str),
    "n_init": ("n_init", int), "chunk_size": ("chunk_size", int),
    "estep": ("estep", str), "n_candidates": ("n_candidates", int), "n_neighbors": ("n_neighbors", int),
}
_ESTEPS = ("dense", "truncated")


def index_factory(d, description, metric=faiss.METRIC_L2, **kwargs) -> GMMIndexIVF:
    """Build a GMMIndexIVF from a FAISS-style description.

    Parameters
    ----------
    d : int
    description : str
        ``"IVF<nlist>_GMM[(<options>)],<encoding>"``, e.g. ``"IVF1024_GMM(diag),Flat"``,
        ``"IVF256_GMM(spherical,copies=1.5,probe=posterior,iter=20),PQ16"``. Options:
        a covariance type (diag | spherical | full), an E-step (dense | truncated), and key=value pairs: tau, copies
        (alias budget), max_copies, T (temperature), probe, nprobe, iter (max_iter), tol,
        reg_covar, seed (random_state), init, device, compute_dtype, n_init, chunk_size, estep,
        n_candidates, n_neighbors.
        The encoding is any FAISS IVF encoding among Flat, PQ<M>[x<nbits>], SQ<bits>, SQfp16.
    metric : faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT, or 'l2' / 'ip' / 'cosine'
    **kwargs
        GMMIndexIVF / GaussianMixture keywords; one given both here and in the string
        must agree.

    Returns
    -------
    GMMIndexIVF, untrained.
    """
    if not isinstance(description, str):
        raise TypeError(f"description must be a string, got {type(description).__name__}")
    match = _FACTORY.match(description)
    if not match:
        raise ValueError(f"cannot parse {description!r}: expected 'IVF<nlist>_GMM[(options)],<encoding>', e.g. "
                         "'IVF1024_GMM(diag),Flat' (for k-means IVF use faiss.index_factory)")
    nlist, options, encoding = int(match.group(1)), match.group(2), match.group(3)
    parsed = {}
    for item in filter(None, (s.strip() for s in (options or "").split(","))):
        if "=" not in item:
            if item not in _COVARIANCE + _ESTEPS:
                raise ValueError(f"{description!r}: unknown option {item!r}; a bare option is a covariance type "
                                 f"{_COVARIANCE} or an E-step {_ESTEPS}, others are key=value")
            key, value = ("covariance_type", item) if item in _COVARIANCE else ("estep", item)
        else:
            name, raw = (s.strip() for s in item.split("=", 1))
            if name not in _OPTIONS:
                raise ValueError(f"{description!r}: unknown option {name!r}; known: {sorted(_OPTIONS)}")
            key, convert = _OPTIONS[name]
            try:
                value = convert(raw)
            except ValueError as err:
                raise ValueError(f"{description!r}: bad value {raw!r} for {name}: {err}") from err
        if key in parsed and parsed[key] != value:
            raise ValueError(f"{description!r}: option {key} given twice ({parsed[key]!r}, {value!r})")
        parsed[key] = value
    for key, value in kwargs.items():
        if key in parsed and parsed[key] != value:
            raise ValueError(f"{key}={value!r} disagrees with {parsed[key]!r} in {description!r}")
        parsed[key] = value
    return GMMIndexIVF(d, nlist, encoding, metric, **parsed)


# ---------------------------------------------------------------------- checks
def _check_nprobe(value, nlist):
    value = check_positive_int(value, "nprobe")
    if value > nlist:
        raise ValueError(f"nprobe must be <= nlist={nlist}, got {value}")
    return value


def _check_probe(value):
    if not isinstance(value, str) or value.lower() not in _PROBE_ALIASES:
        raise ValueError(f"probe must be one of {sorted(_PROBE_ALIASES)}, got {value!r}")
    return _PROBE_ALIASES[value.lower()]
