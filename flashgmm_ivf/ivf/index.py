"""GMMIndexIVF: a FAISS IndexIVF whose lists come from a Gaussian mixture, searched to a recall target.

A drop-in for FAISS IVF code: the same verbs (``train``, ``add``, ``add_with_ids``,
``search``, ``nprobe``, ``ntotal``, ``d``), built from a factory string by changing one
line::

    index = faiss.index_factory(d, "IVF1024,Flat")             # before
    index = flashgmm_ivf.index_factory(d, "IVF1024_GMM,Flat")  # after
    index.train(xt); index.add(xb)
    D, I = index.search(xq, 10, recall=0.9)                     # or nprobe=..., as FAISS

The default recipe: k-means lists (``faiss.Kmeans``, as ``IndexIVF.train``), a coarse step
over the means chosen at calibration (an HNSW graph as ``IVF<nlist>_HNSW32``'s, its links
per node calibrated, or in high dimension a ranking in a few principal directions), a SOAR-spilled second copy
for half of the vectors (1.5 copies per vector), and a per-query depth read from a table
calibrated at training time. Each part is an option; ``partition='gmm'`` gives lists
from a spherical GMM under the same machinery (measured on SIFT and GloVe sets at nlist
1024, they need 4-6% more distance computations than k-means lists at recall@10 0.9-0.95).

Nothing hides the FAISS index: ``.index`` is the real ``faiss.IndexIVFFlat`` /
``IndexIVFPQ`` / ``IndexIVFScalarQuantizer``, ``.quantizer_index`` its quantizer
(``IndexFlat``, ``IndexHNSWFlat`` or ``IndexRefine`` over the means) and ``.gmm`` the fitted
``GaussianMixture``.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings

import faiss
import numpy as np
from tqdm.auto import tqdm

from .._validation import MAX_ABS_VALUE, check_positive_int
from ..mixture import GaussianMixture
from .calibration import K_CAL, Calibration, coarse_candidates, fit_coarse_and_table, fit_table
from .coarse import build, install, name_of
from .partition import PARTITIONS, POINTS_PER_LIST, SPILLS, assign_lists, fit_partition, spill_scores, spill_threshold
from .probing import adaptive_lists, enough_entries, list_sizes, truncate_lists
from .pruning import search_pruned
from .quantizer import METRICS, add_assigned, new_ivf, parse_metric, set_centroids
from .search import SearchStats, cosine_from_l2, preassigned_raw, range_search_nprobe, search_nprobe, search_preassigned

__all__ = ["GMMIndexIVF", "extract_index_ivf", "index_factory", "PROBES", "COVARIANCE_TYPES"]

PROBES = ("adaptive", "radius", "fixed")  # how a search chooses each query's depth
COVARIANCE_TYPES = ("spherical", "diag", "full")
_COARSE = re.compile(r"^(auto|flat|hnsw|pca)(\d+)?$")
# Bins of the depth table: 16 difficulty bins for 'adaptive' / 'radius', one for 'fixed'
# (a calibrated nprobe, the same for every query).
_BINS = {"adaptive": 16, "radius": 16, "fixed": 1}
# Refit the depth table at the next recall search once ntotal moved this much (relative)
# since it was fitted: list sizes and neighbour distances change with the data.
_REFIT_CHANGE = 0.1
# Calibration rows held out of the training rows (see _calibration_rows): at least nlist (so
# most lists hold some query's neighbours) and 2,000; beyond that up to 4 x nlist and 8,192,
# as long as they are at most 1 / _CALIBRATION_SHARE of the rows (held-out rows are lost to
# the partition's fit) and their exact neighbours cost at most _CALIBRATION_ITERS k-means
# iterations over 256 x nlist rows (the k-means runs ~19; the neighbours are a brute force
# at add, n_cal x n distances); at most a quarter of the rows. More stand-ins give the depth
# table's 16 bins enough queries that their depths do not chase noise: with one partition,
# 4 x nlist stand-ins instead of nlist cost 1-5% fewer distance computations at recall
# 0.9-0.95 on SIFT and GloVe test queries (nlist 2048); on 60K-row sets at nlist 1024,
# 4,096 instead of 2,000 gave no gain over three partitions.
_CALIBRATION_ROWS = 2000
_CALIBRATION_PER_LIST, _CALIBRATION_CAP, _CALIBRATION_ITERS, _CALIBRATION_SHARE = 4, 8192, 4, 32
# The largest row norm whose squared distances stay finite in float32: |x - y|^2 <= (|x| + |y|)^2 <= 4 max^2.
_MAX_NORM = math.sqrt(float(np.finfo(np.float32).max) / 4)
_FP16_MAX = float(np.finfo(np.float16).max)
_MAX_ID = np.iinfo(np.int64).max  # ids are int64 in [0, _MAX_ID)
_ADD_BLOCK = 65536  # rows per add step (bounds the temporaries of assignment and calibration)
_SEARCH_BLOCK = 4096  # queries per search step (bounds the over-fetch and deduplication temporaries)
_THRESHOLD_ROWS = 65536  # training rows the spill threshold is set on (a quantile: more add nothing)


def _calibration_rows(n: int, nlist: int) -> int:
    """Default stand-ins held out of n training rows (see ``_CALIBRATION_ROWS``)."""
    affordable = _CALIBRATION_ITERS * POINTS_PER_LIST * nlist * nlist // max(1, n)
    wanted = min(_CALIBRATION_PER_LIST * nlist, _CALIBRATION_CAP, affordable, n // _CALIBRATION_SHARE)
    return min(max(_CALIBRATION_ROWS, nlist, wanted), n // 4)


class GMMIndexIVF:
    """FAISS IVF index whose lists are the components of a Gaussian mixture.

    Parameters
    ----------
    d : int
        Vector dimension.
    nlist : int
        Lists = mixture components K.
    encoding : str, default 'Flat'
        FAISS encoding of the list entries: 'Flat', 'PQ<M>[x<nbits>]', 'SQ8', 'SQ4', 'SQfp16'.
    metric : {'l2', 'ip', 'cosine'} or faiss.METRIC_L2 / METRIC_INNER_PRODUCT, default 'l2'
        'cosine' normalises vectors and queries and indexes them by squared L2 (for unit
        rows |q - x|^2 = 2 - 2 cos), so every L2 rule (SOAR, the depth table, radius
        pruning) applies; search returns cosine similarities, largest first. 'ip' (raw
        inner product) supports ``probe='adaptive'`` and ``'fixed'``.
    partition : {'kmeans', 'gmm'}, default 'kmeans'
        'gmm': a k-means start (``kmeans_iter`` iterations of ``faiss.Kmeans``) then
        ``max_iter`` EM iterations; primary list = most probable component. 'kmeans':
        ``faiss.Kmeans`` with ``kmeans_iter`` iterations, per-list covariances
        computed from the members afterwards; primary list = nearest centroid.
    covariance_type : {'spherical', 'diag', 'full'}, default 'spherical'
    coarse : {'auto', 'hnsw', 'hnsw<M>', 'pca', 'pca<p>', 'flat'}, default 'auto'
        How queries find their lists: an ``IndexHNSWFlat`` over the means (M links per
        node), a projected ranking (``faiss.IndexRefine``: every mean ranked in its p
        principal directions, each such distance counting p / d, then 4 x depth re-ranked by
        true distance; see :mod:`.coarse`) or all nlist distances (``IndexFlat``). 'hnsw'
        chooses M among 8, 16 and 32, 'pca' chooses p among 32, 64 and 128 (those at most
        d / 4), 'auto' among both, whichever makes recall searches cheapest on the calibration
        queries (chosen when the depth table is fitted; under 'ip' a graph keeps 32 links). A
        search at ``nprobe=n`` walks a graph with efSearch = max(``hnsw_ef_search``, n); a
        search at a recall target walks it with the efSearch its depth table was calibrated
        for (see Notes).
    spill : {'soar', 'rair', 'gmm', 'none'}, default 'soar'
        Rule choosing a second list for some vectors: SOAR (Sun et al. 2024, lambda 1),
        RAIR (lambda 0.5), 'gmm' (second most probable component), or none.
    copies : float in [1, 2], default 1.5
        Mean lists per vector, a ceiling: ``train`` sets the rule's score threshold that gives
        this many on the training rows (on an even sample of 65,536 of them when there are
        more, two standard errors below the budget); added vectors are assigned row by row
        against it.
    probe : {'adaptive', 'radius', 'fixed'}, default 'adaptive'
        How ``search(..., recall=r)`` sets each query's depth: 'adaptive' from a table of
        16 difficulty bins (the spread of the query's nearest mean distances; for 'ip' the
        gap between its best and 32nd-best mean scores over its norm) calibrated
        for recall r; 'radius' the same depths as caps, then lists skipped whose half-space
        bound cannot beat the query's current 10th neighbour; 'fixed' one calibrated
        nprobe for all. ``search(..., nprobe=n)`` probes n lists ('radius' prunes within them).
    nprobe : int, default 1
        Lists probed by ``search`` without ``nprobe`` / ``recall`` while ``recall`` is None (FAISS meaning).
    recall : float in (0, 1] or None
        When set, ``search`` without ``nprobe`` / ``recall`` searches at this calibrated recall@10.
    kmeans_iter : int, default 10 ('gmm') / 20 ('kmeans')
        k-means iterations over up to 4 stages on nested samples that double in size up to
        all the fitting rows, most of them on all rows (see ``partition.fit_kmeans``): 20 in
        3 stages on 450,000 SIFT rows (nlist 2048) take 1.3x the time of FAISS's default 10
        on all rows and fit better (held-out k-means cost 0.2% lower; 25 on all rows: 0.2%
        lower still, at 2.1x the time; ``eval/results/check_kmeans_stages_sift.json``).
    max_iter : int, default 5
        EM iterations after the k-means start ('gmm'; exactly this many).
    calibration_rows : int, optional
        Training rows held out as stand-in queries (default: at least nlist and 2,000; up to
        4 x nlist and 8,192 while they are at most 1/32 of the rows and their exact neighbours
        cost no more than 4 k-means iterations; at most a quarter of the rows).
    random_state : int, default 1234
    gmm : GaussianMixture, optional
        A fitted mixture to use as the partition (``train`` then only builds the rest).
    **gmm_params
        GaussianMixture arguments (reg_covar, device, compute_dtype, estep, chunk_size, ...);
        reg_covar defaults to 'auto' (0.1 x the mean per-feature variance of the training rows).

    Attributes
    ----------
    index : faiss.IndexIVF
        The real FAISS index (also ``flashgmm_ivf.extract_index_ivf(gmm_index)``). Its
        ``ntotal`` counts copies, and searched on its own it returns a spilled vector once
        per copy: use ``GMMIndexIVF.search`` / ``flashgmm_ivf.write_index`` (see Notes).
    quantizer_index : faiss.IndexFlat or faiss.IndexHNSWFlat
    gmm : GaussianMixture
    calibration : Calibration or None
        The calibration queries and their exact neighbours in the index.
    probe_table : ProbeTables or None
        The depth tables (one per width of the graph's first walk), fitted lazily (see Notes).
    last_stats : SearchStats or None
        Cost of the last search: codes scanned (copies included, ``faiss.cvar.indexIVF_stats``)
        and coarse distances (``nlist`` per query for a flat quantizer,
        ``faiss.cvar.hnsw_stats.ndis`` for the graph, plus radius pruning's mean-to-mean
        distances).

    Notes
    -----
    Calibration. ``train`` holds ``calibration_rows`` training rows out of the fit as
    stand-in queries. Every ``add`` updates their exact 10 nearest ids among the added
    vectors (brute force over each added block; a stand-in's first copy, at squared distance
    up to 1e-4 |q - m|^2 for roundoff, m the stand-ins' mean, is taken to be itself, since
    training rows are often added too, and not counted). The depth table (recall@10 and
    distance computations per depth and difficulty bin) is fitted on them against the index's
    real lists at the first ``recall`` search after the index changed by more than 10%
    of its size since the last fit: a table fitted on the training rows' own lists at
    train time would misjudge both the list sizes and the neighbour distances of the
    added data, while the refit costs a few coarse walks of the stand-ins and one pass over
    the lists' ids. ``calibrate(queries)`` replaces the stand-ins by real queries.

    Coarse effort. With a graph coarse step a recall search first walks the graph with a
    small efSearch w for the w nearest means of every query (the difficulty feature is
    read from them), then walks again, with efSearch = its depth, only for queries whose
    bin asks for more than w lists (a projected ranking likewise: first w deep, then as
    deep as the bin asks). One table is fitted for each w in 4, 6, 8, 12, 16, 24,
    32, its costs counting both walks' distances besides the codes scanned, and each
    recall target uses the w whose table expects the fewest distance computations on the
    calibration queries. A query's depth is also raised, within the lists already
    ranked, until its lists hold k entries, so a large k never sends it back to search.

    Search deduplicates by id: copies of a vector have the same distance with Flat
    encoding (the best copy's estimate with PQ/SQ). Counters use FAISS's global statistics:
    concurrent searches from several Python threads mix their counts. Queries are searched
    in blocks of 4,096, so the memory a search needs beyond its output is bounded.

    FAISS idioms. These work as in FAISS: ``train``, ``add``, ``add_with_ids``, ``search``
    (with ``params=faiss.SearchParametersIVF(nprobe=..., quantizer_params=
    faiss.SearchParametersHNSW(efSearch=...))``), ``range_search`` (FAISS's ``(lims, D, I)``,
    each id once), ``remove_ids`` (an id array or a ``faiss.IDSelector``; every copy goes),
    ``reset``, ``nprobe``, ``ntotal``, ``d``, ``is_trained``, ``metric_type``, and the factory
    prefix ``"IDMap,IVF1024_GMM,Flat"`` (accepted; ids given to ``add_with_ids`` are kept
    without it). Use the package's functions where FAISS's own cannot take a Python object:
    ``flashgmm_ivf.extract_index_ivf(index)`` (not ``faiss.extract_index_ivf``),
    ``flashgmm_ivf.write_index`` / ``read_index`` (not ``faiss.write_index``), and
    ``add_with_ids`` (not ``faiss.IndexIDMap(index)``). The inner ``index.index`` is a plain
    FAISS IVF index: ``faiss.write_index(index.index)`` writes a file plain FAISS reads, but
    its searches return a spilled vector once per copy (repeated ids), and the GMM, the
    spill threshold and the calibration are not in it. Removing ids through
    ``index.index.remove_ids`` directly is noticed (``ntotal`` is recounted from the inner
    index at next use).
    """

    def __init__(self, d, nlist, encoding="Flat", metric="l2", *, partition="kmeans", covariance_type="spherical",
                 coarse="auto", spill="soar", copies=1.5, probe="adaptive", nprobe=1, recall=None, kmeans_iter=None,
                 max_iter=5, calibration_rows=None, random_state=1234, gmm=None, **gmm_params):
        self._d = check_positive_int(d, "d")
        self._nlist = check_positive_int(nlist, "nlist")
        self.encoding = str(encoding)
        self.metric = parse_metric(metric)
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
        match = _COARSE.match(str(coarse))
        if (not match or (match.group(2) is not None and match.group(1) in ("auto", "flat"))
                or (match.group(1) == "hnsw" and match.group(2) is not None and int(match.group(2)) < 2)
                or (match.group(1) == "pca" and not 1 <= int(match.group(2) or 1) < self._d)):
            raise ValueError(f"coarse must be 'auto', 'hnsw', 'hnsw<M>' with M >= 2 (e.g. 'hnsw32'), 'pca', 'pca<p>' "
                             f"with 1 <= p < d={self._d} (e.g. 'pca64') or 'flat', got {coarse!r}")
        if spill not in SPILLS:
            raise ValueError(f"spill must be one of {SPILLS}, got {spill!r}")
        if isinstance(copies, bool) or not isinstance(copies, numbers.Real) or not 1 <= copies <= 2:
            raise ValueError(f"copies must be a number in [1, 2] (mean lists per vector), got {copies!r}")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        if self.metric == "ip" and probe == "radius":
            raise ValueError("probe='radius' bounds lists by L2 half-spaces; metric 'ip' supports probe='adaptive' "
                             "or 'fixed' (for normalised data use metric='cosine')")
        self.partition, self.covariance_type, self.coarse = partition, covariance_type, str(coarse)
        self.spill, self.copies, self.probe = spill, float(copies), probe
        self.kmeans_iter = check_positive_int(kmeans_iter if kmeans_iter is not None else
                                              (20 if partition == "kmeans" else 10), "kmeans_iter")
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.calibration_rows = None if calibration_rows is None else check_positive_int(calibration_rows,
                                                                                        "calibration_rows")
        self.random_state = int(random_state)
        if gmm is not None:
            if gmm_params:
                raise ValueError(f"give GaussianMixture arguments either through gmm= or as keywords, not both "
                                 f"(got gmm and {sorted(gmm_params)})")
            if not isinstance(gmm, GaussianMixture):
                raise TypeError(f"gmm must be a flashgmm_ivf.GaussianMixture, got {type(gmm).__name__}")
            if gmm.n_components != self._nlist:
                raise ValueError(f"gmm has n_components={gmm.n_components}, but nlist={self._nlist}")
        self.gmm = gmm
        self.gmm_params = dict(gmm_params)
        # 'cosine' is L2 on unit rows inside FAISS (see the class docstring).
        self.index = new_ivf(self._d, self._nlist, self.encoding, "ip" if self.metric == "ip" else "l2")
        self.nprobe = nprobe
        self.recall = recall
        self.calibration = None
        self.probe_table = None
        self.spill_threshold = None
        self._table_ntotal = 0
        self._ntotal = 0
        self._next_id = 0
        self._max_dup = 1
        self._synced_entries = 0  # inner-index entries when _ntotal was last known right
        self._sizes = None  # (inner-index entries, list sizes) of the last recall search
        self.last_stats = None

    # ------------------------------------------------------------------ FAISS-like properties
    @property
    def d(self) -> int:
        return self._d

    @property
    def nlist(self) -> int:
        return self._nlist

    @property
    def ntotal(self) -> int:
        """Vectors held (each counted once, whatever its copies).

        Recounted from the inner index's ids when ``index.index`` was changed directly
        (e.g. ``index.index.remove_ids``), so it never goes stale.
        """
        if self.index.ntotal != self._synced_entries:
            self._resync()
        return self._ntotal

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained) and self.spill_threshold is not None

    @property
    def metric_type(self) -> int:
        """faiss.METRIC_L2 ('l2'), faiss.METRIC_INNER_PRODUCT ('ip', 'cosine': results are similarities)."""
        return faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value):
        self._nprobe = _check_nprobe(value, self._nlist)
        self.index.nprobe = self._nprobe  # the inner index, used alone, probes the same

    @property
    def recall(self):
        return self._recall

    @recall.setter
    def recall(self, value):
        self._recall = None if value is None else _check_recall(value)

    @property
    def quantizer_index(self):
        """The coarse step: ``faiss.IndexFlat``, ``faiss.IndexHNSWFlat`` or ``faiss.IndexRefine`` over the means."""
        return faiss.downcast_index(self.index.quantizer)

    @property
    def coarse_step(self):
        """The coarse step in use, as a ``coarse`` value: 'flat', 'hnsw<M>' or 'pca<p>' (what 'auto' chose)."""
        return name_of(self.quantizer_index)

    @property
    def hnsw_ef_search(self):
        """efSearch of the HNSW coarse step (None for a flat one): a search at nprobe p walks with max(efSearch, p).

        Searches at a recall target walk with the widths their depth table was calibrated for.
        """
        quantizer = self.quantizer_index
        return int(quantizer.hnsw.efSearch) if isinstance(quantizer, faiss.IndexHNSW) else None

    @hnsw_ef_search.setter
    def hnsw_ef_search(self, value):
        quantizer = self.quantizer_index
        if not isinstance(quantizer, faiss.IndexHNSW):
            raise ValueError(f"the coarse step is {self.coarse!r}: no efSearch to set")
        quantizer.hnsw.efSearch = check_positive_int(value, "hnsw_ef_search")

    @property
    def copies_per_vector(self) -> float:
        """Entries in the FAISS index per vector added."""
        n = self.ntotal
        return self.index.ntotal / n if n else 0.0

    def settings(self) -> dict:
        """The constructor keywords that rebuild this index's recipe (what the factory string's options set)."""
        return {"partition": self.partition, "covariance_type": self.covariance_type, "coarse": self.coarse,
                "spill": self.spill, "copies": self.copies, "probe": self.probe, "nprobe": self.nprobe,
                "recall": self.recall, "kmeans_iter": self.kmeans_iter, "max_iter": self.max_iter,
                "calibration_rows": self.calibration_rows, "random_state": self.random_state}

    # ------------------------------------------------------------------ verbs
    def train(self, x):
        """Fit the partition, build the coarse step, hold out calibration rows, train the encoder.

        Parameters
        ----------
        x : array-like of shape (n, d), n >= nlist + calibration rows

        Notes
        -----
        The partition is fitted on at most 256 x nlist rows (as ``faiss.Kmeans`` samples),
        drawn at random (``random_state``) from the rows not held out for calibration.
        """
        x = self._vectors(x, "x", mixture_rows=True)
        n = x.shape[0]
        n_cal = self.calibration_rows if self.calibration_rows is not None else _calibration_rows(n, self._nlist)
        if n - n_cal < self._nlist:
            raise ValueError(f"training needs at least nlist={self._nlist} rows besides the {n_cal} calibration "
                             f"rows held out, got {n} rows")
        rng = np.random.default_rng(self.random_state)
        order = rng.permutation(n)
        cal_rows, fit_rows = np.sort(order[:n_cal]), order[n_cal:]
        fit_rows = np.sort(fit_rows[:POINTS_PER_LIST * self._nlist])
        stages = ["partition", "coarse step", "encoder and spill threshold"]
        with tqdm(total=len(stages), desc="train GMMIndexIVF", unit="step") as bar:
            bar.set_postfix_str(stages[0])
            if self.gmm is None or not hasattr(self.gmm, "means_"):
                self.gmm = fit_partition(x[fit_rows], self._nlist, partition=self.partition,
                                         covariance_type=self.covariance_type, kmeans_iter=self.kmeans_iter,
                                         em_iter=self.max_iter, seed=self.random_state, **self.gmm_params)
            if self.gmm.means_.shape != (self._nlist, self._d):
                raise ValueError(f"gmm means have shape {self.gmm.means_.shape}, expected ({self._nlist}, "
                                 f"{self._d})")
            bar.update()
            bar.set_postfix_str(stages[1])
            self.index = new_ivf(self._d, self._nlist, self.encoding, "ip" if self.metric == "ip" else "l2")
            set_centroids(self.index, self.gmm.means_)
            bar.update()
            bar.set_postfix_str(stages[2])
            # The quantizer is full, so IndexIVF.train skips k-means and trains only the
            # encoder (PQ / SQ on residuals; nothing for Flat).
            try:
                self.index.train(x[fit_rows])
            except RuntimeError as err:  # e.g. PQ / SQ training on too few rows
                raise ValueError(f"FAISS cannot train the {self.encoding!r} encoder on {len(fit_rows)} rows: "
                                 f"{_faiss_message(err)}") from err
            if self.coarse != "flat":  # the reference candidate until the depth table's fit chooses
                quantizer = build(self._coarse_candidates()[0], self.gmm.means_.astype(np.float32),
                                  self.index.metric_type)
                install(self.index, quantizer)
            self.index.nprobe = self._nprobe
            # All training rows, not only those the partition was fitted on: the vectors added
            # later were not fitted either, and fitted rows sit closer to their means.
            rows = x[:: max(1, len(x) // _THRESHOLD_ROWS)]
            score = spill_scores(self.gmm, rows, partition=self.partition, spill_rule=self.spill)[2]
            self.spill_threshold = spill_threshold(score, self.copies, population=len(x))
            bar.update()
        self.calibration = Calibration.empty(x[cal_rows], self.index.metric_type, "training rows")
        self.probe_table, self._table_ntotal = None, 0
        self._ntotal, self._next_id, self._max_dup, self._synced_entries, self._sizes = 0, 0, 1, 0, None

    def add(self, x):
        """Add vectors with ids ntotal, ntotal + 1, ... (as FAISS), each to its primary list and maybe a copy.

        Parameters
        ----------
        x : array-like of shape (n, d)
        """
        x = self._vectors(x, "x")
        if self._next_id > _MAX_ID - x.shape[0]:
            raise ValueError(f"add would give ids up to {self._next_id + x.shape[0] - 1}, past the largest id "
                             f"{_MAX_ID - 1} (ids are int64, -1 marks missing results): the largest id added "
                             f"with add_with_ids is {self._next_id - 1}; keep adding with add_with_ids")
        self._add(x, np.arange(self._next_id, self._next_id + x.shape[0], dtype=np.int64))

    def add_with_ids(self, x, ids):
        """Add vectors with user ids (int64 >= 0).

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
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max - 1:
            raise ValueError(f"ids must be < 2**63 - 1, got {int(ids.max())}")
        ids = ids.astype(np.int64)
        if (ids < 0).any() or (ids == np.iinfo(np.int64).max).any():
            bad = np.flatnonzero((ids < 0) | (ids == np.iinfo(np.int64).max))
            raise ValueError(f"ids must be in [0, 2**63 - 1) (-1 marks missing results): {bad.size} out of range, "
                             f"first at position {int(bad[0])}")
        order = np.argsort(ids, kind="stable")
        repeats = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if repeats.size:
            # Search deduplicates by id: vectors sharing one would hide each other.
            first, again = sorted(order[repeats[0]:repeats[0] + 2].tolist())
            raise ValueError(f"ids must be distinct: {repeats.size} repeat an earlier one, e.g. id "
                             f"{int(ids[first])} at positions {first} and {again}")
        self._add(x, ids)

    def _add(self, x, ids):
        self._check_trained("add")
        n_before = self.ntotal  # notices direct changes of the inner index before adding to it
        # Lists of every row first (refusing bad rows before anything is added), then one add:
        # each list is resized once (``add_assigned``).
        blocks = range(0, x.shape[0], _ADD_BLOCK)
        assigned = []
        # disable only when True: an explicit False would override TQDM_DISABLE.
        for start in tqdm(blocks, desc="assign", unit="block", **({"disable": True} if len(blocks) < 4 else {})):
            xb = x[start:start + _ADD_BLOCK]
            assigned.append(self.assign(xb, normalised=True))
            if self.encoding == "SQfp16":
                self._check_fp16_residuals(xb, assigned[-1], start)
        if assigned:
            lists = np.concatenate(assigned)
            add_assigned(self.index, x, lists, ids)
            for start in blocks:
                self.calibration.update(x[start:start + _ADD_BLOCK], ids[start:start + _ADD_BLOCK])
            self._max_dup = max(self._max_dup, int((lists >= 0).sum(1).max()))
            self._ntotal = n_before + x.shape[0]
            self._next_id = max(self._next_id, int(ids.max()) + 1)
        self._synced_entries, self._sizes = self.index.ntotal, None

    def _check_fp16_residuals(self, x, lists, offset):
        """SQfp16 stores each residual x - mu_list in float16: one beyond its range would be stored
        as infinity (distances inf, the vector never found), so such rows are refused."""
        means = self.gmm.means_.astype(np.float32)
        largest = np.zeros(x.shape[0])
        for j in range(lists.shape[1]):
            held = lists[:, j] >= 0
            largest[held] = np.maximum(largest[held], np.abs(x[held] - means[lists[held, j]]).max(1))
        bad = np.flatnonzero(largest > _FP16_MAX)
        if bad.size:
            raise ValueError(f"encoding 'SQfp16' stores residuals as float16 (|value| <= {_FP16_MAX:g}): {bad.size} "
                             f"row(s) lie further from their list's mean, the first is row {offset + int(bad[0])} "
                             f"({largest[bad[0]]:.3g}); rescale the data or use SQ8 / Flat (nothing was added)")

    def assign(self, x, *, normalised=False) -> np.ndarray:
        """The lists each row of x would be added to (without adding).

        Returns
        -------
        ndarray of shape (n, 1) or (n, 2), int64: primary list, then the spilled copy or -1.
        """
        self._check_trained("assign")
        if not normalised:
            x = self._vectors(x, "x")
        return assign_lists(self.gmm, x, partition=self.partition, spill_rule=self.spill,
                            threshold=self.spill_threshold)

    def calibrate(self, queries, neighbors=None):
        """Refit the depth table on real queries instead of the held-out training rows.

        Parameters
        ----------
        queries : array-like of shape (nq, d), nq >= nlist
            A few times nlist if you have them: the depths are chosen on these queries and
            fit them a little better than new ones.
        neighbors : array-like of shape (nq, >= 10), int, optional
            Ids of each query's exact nearest neighbours in the index, nearest first. Default:
            computed by the index, scanning all its lists (Flat encoding only: PQ/SQ codes
            are not exact), and kept exact by later ``add`` calls; a query's first copy
            (squared distance up to 1e-4 |q - m|^2, m the queries' mean) is taken to be the query itself and not counted. Given neighbours are kept as they
            are: call ``calibrate`` again after adding more vectors.
        """
        self._check_trained("calibrate")
        queries = self._vectors(queries, "queries")
        if queries.shape[0] < self._nlist:
            raise ValueError(f"calibration needs at least nlist={self._nlist} queries, got {queries.shape[0]}: "
                             "with fewer, most lists hold no query's neighbour and the depths are guesses")
        calibration = Calibration.empty(queries, self.index.metric_type, "queries")
        if neighbors is None:
            if self.encoding != "Flat":
                raise ValueError(f"encoding {self.encoding!r} stores approximate codes: give the queries' exact "
                                 "neighbours as neighbors=")
            if self.ntotal == 0:
                raise ValueError("the index is empty: add vectors before calibrate")
            self._exact_neighbors(calibration)
        else:
            neighbors = np.asarray(neighbors)
            if neighbors.ndim != 2 or neighbors.shape[0] != queries.shape[0] or neighbors.shape[1] < 10 \
                    or neighbors.dtype.kind not in "iu":
                raise ValueError(f"neighbors must be integers of shape ({queries.shape[0]}, >= 10), got "
                                 f"{neighbors.dtype}{neighbors.shape}")
            calibration.ids = np.ascontiguousarray(neighbors[:, :10], dtype=np.int64)
            calibration.self_pending[:] = False
            # Distances unknown: the best possible, so later adds never displace given neighbours.
            best = -np.inf if self.index.metric_type == faiss.METRIC_L2 else np.inf
            calibration.distances = np.full(calibration.ids.shape, best, np.float32)
        self.calibration = calibration
        self._fit_table()

    def search(self, x, k, *, nprobe=None, recall=None, params=None):
        """k nearest neighbours with distinct ids.

        Parameters
        ----------
        x : array-like of shape (nq, d)
        k : int >= 1
        nprobe : int in [1, nlist], optional
            Lists probed per query (FAISS meaning; with probe 'radius' the cap within which
            lists are pruned).
        recall : float in (0, 1], optional
            Target recall@10: each query's depth from the calibrated table (see the class). With
            PQ / SQ codes, the share of the exact 10 nearest that the probed lists hold: the
            codes' own error lowers the recall returned further.
        params : faiss.SearchParametersIVF, optional
            FAISS's per-call parameters: its ``nprobe``, and the efSearch of a
            ``faiss.SearchParametersHNSW`` in its ``quantizer_params``.

        Without nprobe, recall and params: ``self.recall`` if set, else ``self.nprobe``.

        Returns
        -------
        D : ndarray of shape (nq, k), float32
            Squared L2 distances (ascending), or inner products / cosine similarities (descending).
        I : ndarray of shape (nq, k), int64
            Distinct ids per row; -1 (with distance +/-3.4e38) only when the probed lists
            hold fewer than k distinct ids.
        """
        self._check_trained("search")
        if self.ntotal == 0:
            raise ValueError("the index is empty: add vectors before search")
        nprobe = _nprobe_from_params(params, nprobe)
        if nprobe is not None and recall is not None:
            raise ValueError(f"give either nprobe (lists per query) or recall (a target), not both "
                             f"(got nprobe={nprobe!r}, recall={recall!r})")
        x = self._vectors(x, "x")
        k = check_positive_int(k, "k")
        if nprobe is not None:
            nprobe = _check_nprobe(nprobe, self._nlist)
        elif recall is not None:
            recall = _check_recall(recall)
        elif self._recall is not None:
            recall = self._recall
        else:
            nprobe = self._nprobe
        ef = _quantizer_ef(params)
        saved_ef = self.hnsw_ef_search
        if ef is not None and saved_ef is not None:
            self.hnsw_ef_search = ef
        stats = SearchStats()
        try:
            D = np.empty((x.shape[0], k), np.float32)
            I = np.empty((x.shape[0], k), np.int64)
        except MemoryError as err:  # numpy refuses the allocation at once: the caller's k, not an exhausted heap
            raise ValueError(f"k={k}: the ({x.shape[0]}, {k}) results do not fit in memory ({err})") from err
        try:
            # Blocks of queries bound the over-fetch (k x copies per row) and deduplication
            # temporaries to a fixed size, whatever nq.
            for start in range(0, x.shape[0], _SEARCH_BLOCK):
                end = start + _SEARCH_BLOCK
                D[start:end], I[start:end] = self._search(x[start:end], k, nprobe, recall, stats)
        finally:
            if ef is not None and saved_ef is not None:
                self.hnsw_ef_search = saved_ef
        self.last_stats = stats
        if self.metric == "cosine":  # squared L2 of unit rows -> cosine similarity, as FAISS pads IP results
            cosine_from_l2(D, I)
        return D, I

    def _search(self, x, k, nprobe, recall, stats):
        if recall is None:
            if self.probe == "radius":
                D, I = search_pruned(self.index, x, k, nprobe, 1.0, rank=min(k, 10), stats=stats)
                return self._fill_short_rows(x, k, D, I, stats, nprobe=nprobe)
            return search_nprobe(self.index, x, k, nprobe, max_dup=self._max_dup, copies=self._copies(),
                                 stats=stats)
        if self._ntotal <= K_CAL or (self.calibration is not None and len(self.calibration.queries) == 0):
            # Too few vectors for a stand-in to have K_CAL neighbours besides itself, or too few
            # training rows (under 4) to hold one out, so no depth table: scan every list (exact,
            # and cheap at this size; ``calibrate(queries)`` gives the index a table).
            return search_nprobe(self.index, x, k, self._nlist, max_dup=self._max_dup, copies=self._copies(),
                                 stats=stats)
        table = self._current_table().for_recall(recall)
        if table.reach < recall:
            warnings.warn(f"recall={recall} is more than the depth table reaches: {table.reach:.3f} on its calibration "
                          f"queries, probing {table.depth} of {self._nlist} lists; searching at that depth",
                          RuntimeWarning, stacklevel=3)
        dis, lists, depth, evaluations = adaptive_lists(self.index, x, table, recall)
        depth = enough_entries(self.index, lists, depth, k, sizes=self._list_sizes())
        if self.probe == "radius":
            D, I = search_pruned(self.index, x, k, depth, 1.0, rank=min(k, 10), ranked=(dis, lists, evaluations),
                                 stats=stats)
        else:
            D, I = search_preassigned(self.index, x, k, *truncate_lists(lists, dis, depth), max_dup=self._max_dup,
                                      copies=self._copies(), ncoarse=evaluations, stats=stats)
        return self._fill_short_rows(x, k, D, I, stats, depth=depth)

    def _fill_short_rows(self, x, k, D, I, stats, *, depth=None, nprobe=None):
        """Rows with fewer than k ids, searched again without pruning: at the caller's ``nprobe``
        lists, or from twice their ``depth`` (a recall search), doubling until they have k.

        A recall target promises k results whenever the index holds k vectors; a table fitted
        on a small or uneven index, or a k larger than its lists, can pick lists that together
        hold fewer. Radius pruning bounds the first min(k, 10) results only, and may skip lists
        that the rest of a long row needs.
        """
        short = np.flatnonzero((I < 0).any(axis=1)) if self._ntotal >= k else np.empty(0, np.int64)
        if short.size == 0:
            return D, I
        D, I = D.copy(), I.copy()
        more = SearchStats()
        probe = nprobe if nprobe is not None else min(self._nlist, 2 * int(depth[short].max()))
        while short.size:
            D[short], I[short] = search_nprobe(self.index, x[short], k, probe, max_dup=self._max_dup,
                                               copies=self._copies(), stats=more)
            stats.n_refetch += short.size
            short = short[(I[short] < 0).any(axis=1)]
            if nprobe is not None or probe == self._nlist:
                break
            probe = min(self._nlist, 2 * probe)
        # The same queries searched again: their work counts, they do not count as new queries.
        stats.ndis, stats.ncoarse, stats.nlists = stats.ndis + more.ndis, stats.ncoarse + more.ncoarse, \
            stats.nlists + more.nlists
        return D, I

    def _coarse_candidates(self):
        """The coarse steps ``coarse`` chooses among (:func:`.calibration.coarse_candidates`)."""
        return coarse_candidates(self.coarse, self._d, self.index.metric_type)

    def _copies(self):
        """Entries per vector of the inner index (sizes the over-fetch of a search)."""
        return self.index.ntotal / max(1, self._ntotal)

    def _list_sizes(self):
        """:func:`.probing.list_sizes` of the inner index, read again whenever its entry count changed."""
        if self._sizes is None or self._sizes[0] != self.index.ntotal:
            self._sizes = (self.index.ntotal, list_sizes(self.index))
        return self._sizes[1]

    def _current_table(self):
        """The depth table, refitted when the index changed by more than 10% since the last fit."""
        if self.probe_table is None or abs(self.ntotal - self._table_ntotal) > _REFIT_CHANGE * self._table_ntotal:
            self._fit_table()
        return self.probe_table

    def _fit_table(self):
        if self.calibration is None:
            raise ValueError("the index has no calibration queries: train it, or call calibrate(queries)")
        candidates = self._coarse_candidates()
        if len(candidates) > 1:
            _, self.probe_table = fit_coarse_and_table(self.index, self.calibration, _BINS[self.probe], candidates)
        else:
            self.probe_table = fit_table(self.index, self.calibration, _BINS[self.probe])
        self._table_ntotal = self._ntotal

    def _exact_neighbors(self, calibration):
        """Exact neighbours of the calibration queries by scanning every list (Flat codes are the vectors)."""
        nq = calibration.queries.shape[0]
        lists = np.broadcast_to(np.arange(self._nlist, dtype=np.int64), (nq, self._nlist))
        kk = min(int(self.index.ntotal), (10 + 1) * self._max_dup)
        D, I = preassigned_raw(self.index, calibration.queries, kk, lists, np.zeros(lists.shape, np.float32))
        calibration.merge_results(D, I)

    def remove_ids(self, ids) -> int:
        """Remove vectors by id, every copy of each (FAISS's ``remove_ids``).

        Parameters
        ----------
        ids : array-like of shape (n,) of integer ids, or a ``faiss.IDSelector``

        Returns
        -------
        int, vectors removed (each counted once, whatever its copies).

        Notes
        -----
        ``ntotal`` and, for Flat encoding, the calibration queries' exact neighbours are
        recomputed; with PQ/SQ, neighbours given to ``calibrate`` are kept (call it again
        with the new neighbours). The depth table is refitted at the next recall search.
        """
        self._check_trained("remove_ids")
        if isinstance(ids, faiss.IDSelector):
            selector = ids
        else:
            ids = np.asarray(ids)
            if ids.dtype.kind not in "iu" or ids.ndim != 1:
                raise TypeError(f"ids must be a 1-D array of integers or a faiss.IDSelector, got "
                                f"{ids.dtype}{ids.shape}")
            ids = np.ascontiguousarray(ids[(ids >= 0) & (ids < _MAX_ID)], dtype=np.int64)
            selector = faiss.IDSelectorBatch(ids)  # ids stays referenced until remove_ids returns
        before = self.ntotal
        self.index.remove_ids(selector)
        self._resync()
        return before - self._ntotal

    def _resync(self):
        """Recount the distinct ids of the inner index; refresh the calibration when vectors went away."""
        stored = stored_ids(self.index)
        removed = self._ntotal - stored.size
        self._ntotal, self._synced_entries, self._sizes = int(stored.size), self.index.ntotal, None
        if removed and self.calibration is not None:
            if self.encoding == "Flat":
                self.calibration = Calibration.empty(self.calibration.queries, self.index.metric_type,
                                                     self.calibration.source)
                if self._ntotal:
                    self._exact_neighbors(self.calibration)
            self.probe_table, self._table_ntotal = None, 0

    def range_search(self, x, radius, *, nprobe=None, params=None):
        """All vectors within ``radius`` of each query, each id once (FAISS's ``range_search``).

        Parameters
        ----------
        x : array-like of shape (nq, d)
        radius : float
            Squared L2 distance (results strictly below it), or for 'ip' / 'cosine' a
            similarity (results strictly above it), as FAISS.
        nprobe : int in [1, nlist], optional (default ``self.nprobe``; ``params.nprobe`` if given)
        params : faiss.SearchParametersIVF, optional

        Returns
        -------
        lims : ndarray of shape (nq + 1,), int64; query i's results are ``lims[i]:lims[i+1]``
        D : ndarray of shape (lims[-1],), float32, each query's results best first
        I : ndarray of shape (lims[-1],), int64, distinct within a query
        """
        self._check_trained("range_search")
        nprobe = _nprobe_from_params(params, nprobe)
        nprobe = _check_nprobe(self._nprobe if nprobe is None else nprobe, self._nlist)
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not math.isfinite(radius):
            raise ValueError(f"radius must be a finite number, got {radius!r}")
        x = self._vectors(x, "x")
        inner_radius = 2.0 - 2.0 * float(radius) if self.metric == "cosine" else float(radius)
        stats = SearchStats()
        lims, D, I = range_search_nprobe(self.index, x, inner_radius, nprobe, stats=stats)
        self.last_stats = stats
        if self.metric == "cosine":
            cosine_from_l2(D, I)
        return lims, D, I

    def reset(self):
        """Remove all vectors; training (partition, coarse step, encoder, calibration queries) is kept."""
        self.index.reset()
        self._ntotal, self._next_id, self._max_dup, self._synced_entries, self._sizes = 0, 0, 1, 0, None
        if self.calibration is not None:
            self.calibration = Calibration.empty(self.calibration.queries, self.index.metric_type,
                                                 self.calibration.source)
        self.probe_table, self._table_ntotal = None, 0

    def memory_usage(self) -> dict:
        """Bytes held, by part.

        Returns
        -------
        dict with n_vectors, n_entries (copies included), copies_per_vector, code_bytes
        (entries x code_size), id_bytes (entries x 8), quantizer_bytes (the coarse step,
        serialized: means and graph), calibration_bytes (queries, neighbours, table),
        total_bytes.
        """
        entries = int(self.index.ntotal)
        code = entries * int(self.index.code_size)
        ids = entries * 8
        quantizer = int(faiss.serialize_index(self.quantizer_index).nbytes)
        calibration = 0
        if self.calibration is not None:
            calibration = sum(a.nbytes for a in (self.calibration.queries, self.calibration.ids,
                                                 self.calibration.distances))
        if self.probe_table is not None:
            calibration += self.probe_table.nbytes
        return {"n_vectors": self.ntotal, "n_entries": entries, "copies_per_vector": self.copies_per_vector,
                "code_bytes": code, "id_bytes": ids, "quantizer_bytes": quantizer,
                "calibration_bytes": calibration, "total_bytes": code + ids + quantizer + calibration}

    def __repr__(self):
        return (f"GMMIndexIVF(d={self._d}, nlist={self._nlist}, encoding={self.encoding!r}, metric={self.metric!r}, "
                f"partition={self.partition!r}, covariance_type={self.covariance_type!r}, coarse={self.coarse!r}, "
                f"spill={self.spill!r}, copies={self.copies}, probe={self.probe!r}, nprobe={self._nprobe}, "
                f"recall={self._recall}, ntotal={self._ntotal})")

    # ------------------------------------------------------------------ helpers
    def _check_trained(self, what):
        if not self.is_trained:
            raise ValueError(f"the index is not trained: call train before {what}")

    def _vectors(self, x, name, *, mixture_rows=False):
        """x as C-contiguous float32 (n, d), finite, not overflowing float32 distances, normalised for 'cosine';
        ``mixture_rows``: rows the lists' GaussianMixture is fitted on, within its ``MAX_ABS_VALUE``."""
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
        if x.size == 0:
            return x
        # Two reductions answer both checks for nearly all data (NaN propagates through min / max;
        # |x_i| <= m bounds every row norm by m sqrt(d)); rows are looked at one by one only
        # when they fail, to name the first bad one.
        low, high = float(x.min()), float(x.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            finite = np.isfinite(x).all(1)
            bad = np.flatnonzero(~finite)
            raise ValueError(f"{name} contains {bad.size} row(s) with NaN or infinity; the first is row {int(bad[0])}")
        if METRICS[self.metric][1]:
            zero = ~x.any(1)
            if zero.any():
                bad = np.flatnonzero(zero)
                raise ValueError(f"{name} has {bad.size} zero row(s) (no direction for metric 'cosine'); "
                                 f"the first is row {int(bad[0])}")
            # In float64: faiss.normalize_L2 sums squares in float32, which overflow from |x| ~ 1.8e19.
            norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))
            x = (x / norms[:, None]).astype(np.float32)
        elif max(-low, high) * math.sqrt(self._d) > _MAX_NORM:
            norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))
            if (norms > _MAX_NORM).any():
                bad = np.flatnonzero(norms > _MAX_NORM)
                raise ValueError(f"{name} has {bad.size} row(s) with norm above {_MAX_NORM:.3g} (first: row "
                                 f"{int(bad[0])}, norm {norms[bad[0]]:.3g}): their squared distances overflow "
                                 "float32; rescale the data")
        if mixture_rows and not METRICS[self.metric][1] and max(-low, high) > MAX_ABS_VALUE:
            # The lists' model is stored with the index; it could not be read back.
            raise ValueError(f"{name} holds values up to |x| = {max(-low, high):.3g}; the index models its lists "
                             f"with a GaussianMixture, which holds data with |x| <= {MAX_ABS_VALUE:g}: rescale the "
                             "data")
        return x


# ---------------------------------------------------------------------- factory
_FACTORY = re.compile(r"^\s*IVF(\d+)_GMM(?:\(([^()]*)\))?\s*,\s*(\S.*?)\s*$")
_IDMAP = re.compile(r"^\s*IDMap2?\s*,")
_ESTEPS = ("dense", "truncated")
# Option names in the string -> keyword of GMMIndexIVF / GaussianMixture, and a parser.
_OPTIONS = {
    "partition": ("partition", str), "coarse": ("coarse", str), "spill": ("spill", str),
    "copies": ("copies", float), "probe": ("probe", str), "nprobe": ("nprobe", int), "recall": ("recall", float),
    "kmeans_iter": ("kmeans_iter", int), "iter": ("max_iter", int), "max_iter": ("max_iter", int),
    "calibration_rows": ("calibration_rows", int),
    "reg_covar": ("reg_covar", lambda v: v if v == "auto" else float(v)),
    "seed": ("random_state", int), "random_state": ("random_state", int),
    "device": ("device", str), "compute_dtype": ("compute_dtype", str), "chunk_size": ("chunk_size", int),
    "estep": ("estep", str), "n_candidates": ("n_candidates", int), "n_neighbors": ("n_neighbors", int),
}


def index_factory(d, description, metric=faiss.METRIC_L2, **kwargs) -> GMMIndexIVF:
    """Build a GMMIndexIVF from a FAISS-style description.

    Parameters
    ----------
    d : int
    description : str
        ``"[IDMap,]IVF<nlist>_GMM[(<options>)],<encoding>"``, e.g. ``"IVF1024_GMM,Flat"`` (the default
        recipe) or ``"IVF1024_GMM(diag,coarse=flat,spill=none,probe=fixed),PQ16"``. Options:
        a covariance type (spherical | diag | full) or an E-step (dense | truncated) as a
        bare word, and key=value pairs: partition (gmm | kmeans), coarse (auto | hnsw | hnsw<M> | pca | pca<p> | flat),
        spill (soar | rair | gmm | none), copies, probe (adaptive | radius | fixed), nprobe,
        recall, kmeans_iter, iter (EM iterations), calibration_rows, reg_covar, seed,
        device, compute_dtype, chunk_size, estep, n_candidates, n_neighbors.
        The encoding is a FAISS IVF encoding: Flat, PQ<M>[x<nbits>], SQ<bits>, SQfp16.
        A leading ``IDMap,`` (or ``IDMap2,``) is accepted and changes nothing: the index keeps
        the ids given to ``add_with_ids`` itself.
    metric : faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT, or 'l2' / 'ip' / 'cosine'
    **kwargs
        GMMIndexIVF / GaussianMixture keywords; one given both here and in the string must agree.

    Returns
    -------
    GMMIndexIVF, untrained.
    """
    if not isinstance(description, str):
        raise TypeError(f"description must be a string, got {type(description).__name__}")
    # FAISS's "IDMap," prefix: GMMIndexIVF keeps user ids itself (add_with_ids), so it adds nothing.
    match = _FACTORY.match(_IDMAP.sub("", description, count=1))
    if not match:
        raise ValueError(f"cannot parse {description!r}: expected 'IVF<nlist>_GMM[(options)],<encoding>', e.g. "
                         "'IVF1024_GMM,Flat' (for k-means IVF use faiss.index_factory)")
    nlist, options, encoding = int(match.group(1)), match.group(2), match.group(3)
    parsed = {}
    for item in filter(None, (s.strip() for s in (options or "").split(","))):
        if "=" not in item:
            if item not in COVARIANCE_TYPES + _ESTEPS:
                raise ValueError(f"{description!r}: unknown option {item!r}; a bare option is a covariance type "
                                 f"{COVARIANCE_TYPES} or an E-step {_ESTEPS}, others are key=value")
            key, value = ("covariance_type", item) if item in COVARIANCE_TYPES else ("estep", item)
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


def stored_ids(index_ivf) -> np.ndarray:
    """The distinct ids held in an IndexIVF's inverted lists."""
    invlists = index_ivf.invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(index_ivf.nlist) if invlists.list_size(i)]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def extract_index_ivf(index) -> faiss.IndexIVF:
    """The real ``faiss.IndexIVF`` inside ``index`` (``faiss.extract_index_ivf`` that also takes a GMMIndexIVF).

    Parameters
    ----------
    index : GMMIndexIVF, or any FAISS index ``faiss.extract_index_ivf`` accepts

    Returns
    -------
    faiss.IndexIVF (downcast). Searching it directly returns a spilled vector once per copy.
    """
    if isinstance(index, GMMIndexIVF):
        return index.index
    if not isinstance(index, faiss.Index):
        raise TypeError(f"index must be a GMMIndexIVF or a faiss.Index, got {type(index).__name__}")
    return faiss.extract_index_ivf(index)


# ---------------------------------------------------------------------- checks
def _nprobe_from_params(params, nprobe):
    """nprobe as given, or taken from a ``faiss.SearchParametersIVF`` (not both)."""
    if params is None:
        return nprobe
    if not isinstance(params, faiss.SearchParametersIVF):
        raise TypeError(f"params must be a faiss.SearchParametersIVF, got {type(params).__name__}")
    if nprobe is not None:
        raise ValueError("give nprobe either as nprobe= or in params, not both")
    return int(params.nprobe)


def _check_nprobe(value, nlist):
    value = check_positive_int(value, "nprobe")
    if value > nlist:
        raise ValueError(f"nprobe must be <= nlist={nlist}, got {value}")
    return value


def _check_recall(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"recall must be a number in (0, 1] (target recall@10), got {value!r}")
    return float(value)


def _faiss_message(err):
    """The reason line of a FAISS RuntimeError (without the C++ location)."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
    return text.split("Error: ", 1)[-1]


def _quantizer_ef(params):
    """efSearch of a SearchParametersHNSW inside SearchParametersIVF.quantizer_params, or None."""
    if params is None or params.quantizer_params is None:
        return None
    inner = params.quantizer_params
    return int(inner.efSearch) if isinstance(inner, faiss.SearchParametersHNSW) else None
