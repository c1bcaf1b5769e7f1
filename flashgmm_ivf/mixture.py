"""GaussianMixture: scikit-learn's estimator, with a fused E-step and streaming EM."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from . import kernels
from ._chunks import ChunkSource, device_blocks, device_copy
from ._graph import GraphedStep
from ._init import INIT_METHODS, initial_means, sample_size, uniform_sample
from ._mstep import (COVARIANCE_TYPES, FLOAT32_RELATIVE_FLOOR, EMState, kernel_params, m_step, n_parameters,
                     precisions_cholesky)
from ._estimator import BaseEstimator, ConvergenceWarning, DensityMixin, NotFittedError
from ._validation import MAX_ABS_MEAN, MAX_ABS_VALUE, Instances, Integer, Options, Real, as_rows, validate_params
from .kernels import EStepResult, NaturalParams
from .kernels.estep_params import float32_natural_params
from .kernels.mstep import EMPTY_MASS
from .kernels.truncated import TruncatedEStep

DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("float32", "float64")
RESEED_CANDIDATES = 32
ESTEPS = ("auto", "dense", "truncated")
# estep='auto' truncates from this many components on: there a dense pass costs
# >= 4096 log-densities per row, the truncated one ~n_candidates * (n_neighbors + 1).
AUTO_TRUNCATED_MIN = 4096
# Largest (rows, K) block iter_weighted_log_prob hands out: chunk_size rows alone would be
# 17 GB at K = 16,384.
LOG_PROB_BLOCK_BYTES = 256 << 20
CACHE_DATA = ("auto", True, False)
# Fewest rows per block of a cached copy the dense kernels read (see GaussianMixture._cached).
CACHED_KERNEL_BLOCK = 1 << 20
# cache_data='auto' copies the data to the GPU when it takes at most this share of the free
# memory: the rest stays for the E-step's blocks and, truncated, the candidate sets.
CACHE_FREE_FRACTION = 0.5
# EM iterations after which a device copy's rows are grouped by best component (``_group_rows``).
GROUP_ROWS_AFTER = frozenset({1})
# Initialisations tried at most: each is a whole EM run, so more is a hang, not a search.
MAX_N_INIT = 1000
# Captures of an EM iteration a fit makes (``_em_iteration``): each one after the first follows an
# iteration whose 'candidates' E-step outgrew its sizes, and costs that iteration twice.
MAX_CAPTURES = 4
ILL_DEFINED = ("Fitting the mixture model failed because some components have ill-defined empirical covariance (for "
               "instance caused by singleton or collapsed samples). Try to decrease the number of components, "
               "increase reg_covar, or scale the input data.")
# Squared Mahalanobis distances up to which float32 log-densities (and their sums over
# features) stay far from overflow; inference computes blocks reaching further in float64,
# up to FLOAT64_REACH.
FLOAT32_REACH = 1e30
FLOAT64_REACH = 1e290


class GaussianMixture(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by EM with a fused E-step that never stores N x K responsibilities.

    Parameters and attributes follow :class:`sklearn.mixture.GaussianMixture`.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'diag', 'spherical', 'full'}, default='diag'
        'full' runs the torch path only and is meant for D <= 256.
    tol : float, default=1e-3
        EM stops when the lower bound (mean log-likelihood per sample) changes by less.
    reg_covar : float, default=1e-6
        Added to every variance: the floor that keeps collapsed components finite (see also
        ``variance_floor``).
    max_iter : int, default=100
    n_init : int, default=1
        Initialisations tried; the one with the highest lower bound is kept.
    init_params : {'kmeans', 'k-means++', 'random_from_data', 'random'}, default='kmeans'
        How the initial means are drawn, from a uniform sample of at most 256 rows per
        component ('kmeans' is ``faiss.Kmeans``). Weights and covariances then come from
        assigning every row to its nearest initial mean. 'random' (scikit-learn's): every
        row's responsibilities drawn uniformly and normalised, then an M-step.
    weights_init : array of shape (n_components,), optional
    means_init : array of shape (n_components, n_features), optional
    precisions_init : array, optional
        Precisions (inverse covariances): (K,) spherical, (K, D) diag, (K, D, D) full.
    random_state : int, numpy Generator or None
    warm_start : bool, default=False
        Start the next fit from the current parameters (n_init is then 1).
    verbose : int, default=0
        1: a tqdm bar over EM iterations; 2: also a bar over the chunks of each pass.
    device : {'auto', 'cpu', 'cuda'}, default='auto'
        'auto' is CUDA when available. On CUDA, float32 diag/spherical models use the
        Triton kernels; everything else uses the torch reference on that device.
    chunk_size : int, default=262144
        Rows per block moved to the device: memory use is O(chunk_size * K) at most. On CUDA,
        numpy data (memmaps, h5py) is streamed through pinned host buffers, the next blocks'
        reads and host-to-device copies overlapping the compute on this one
        (``_chunks.device_blocks``: a few blocks in flight, whatever N is).
    cache_data : {'auto', True, False}, default='auto'
        On CUDA, copy the data set to the GPU once at the start of ``fit`` and read every EM
        pass from that copy (in the dtype the kernels read: uint8 stays uint8, and float rows
        whose values are all byte-sized integers, SIFT read as float32, are held as bytes). 'auto' does so
        when the copy takes at most half of the GPU's free memory; False streams every pass
        from the host, for data the GPU must not hold. Ignored on the CPU.
    compute_dtype : {'float32', 'float64'}, default='float32'
        Arithmetic of the E-step. Statistics are always summed, and the M-step done, in float64.
    precision : {'auto', 'candidates', 'bf16x3', 'tf32x3', 'ieee', 'tf32', 'bf16'}, default='auto'
        Tensor-core scheme of the Triton kernels (CUDA, diag and spherical; see
        ``flashgmm_ivf.kernels.tile``). 'candidates': bf16 products find, with a proven error
        bound, every component within 30 nats of each row's best; log Z and the statistics are
        then float32 over those alone (``flashgmm_ivf.kernels.exact_candidates``), and rows
        whose posteriors are too flat for that take 'bf16x3'. ``fit`` keeps each row's best
        component between EM iterations for it (4 bytes a row, on the device), and the search
        takes up to 1.5 GB of buffers (two sub-blocks of ``exact_candidates.SUB_BLOCK_BYTES``).
        'bf16x3' and 'tf32x3' evaluate every (row, component) pair with three products (~1e-5
        relative in the statistics; 'ieee' float32 FMA). 'tf32' and 'bf16' are fast and loose
        (~1e-3 relative) and opt-in only. 'auto' is 'candidates', whose statistics are the most
        accurate (~1e-7 relative) and, at N = 1M, K = 1024 on an H100, the fastest:
        ``docs/gpu.md`` has the times.
    variance_floor : 'auto' or float >= 0, default='auto'
        Diagonal and spherical variances are kept at least this times the data's mean squared
        deviation (per feature) from the point the E-step expands around, and so are full
        covariances' variances (those still not positive definite get it added to their whole
        diagonal). float32 log-densities cannot resolve smaller variances on raw-scale data (a
        feature a component collapsed on costs tens of nats; see
        ``_mstep.FLOAT32_RELATIVE_FLOOR``). 'auto' is 1e-4
        with ``compute_dtype='float32'`` and 0 (scikit-learn's model: ``reg_covar`` alone)
        with 'float64'.
    estep : {'auto', 'dense', 'truncated'}, default='auto'
        'dense' evaluates every row against all K components. 'truncated' is truncated
        variational EM (``flashgmm_ivf.kernels.truncated``): each row keeps its
        ``n_candidates`` best components and each E-step ranks those and their
        ``n_neighbors`` nearest components (by distance between means), so an iteration
        costs O(N n_candidates n_neighbors D) instead of O(N K D). 'auto' is 'truncated'
        from K = 4096 on (diag and spherical), 'dense' below. Not for 'full' covariances.
    n_candidates : int, default=8
        C', components kept per row by the truncated E-step (clipped to K).
    n_neighbors : int, default=12
        G, neighbours per component in the graph the truncated E-step searches (clipped to K - 1).

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray of shape (K,), (K, D) or (K, D, D)
    precisions_ : ndarray, same shape as covariances_
    precisions_cholesky_ : ndarray, same shape as covariances_
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood per sample in the last E-step of the best initialisation
        (of the parameters before the final M-step, as in scikit-learn). With the
        truncated E-step it is the truncated free energy per sample,
        mean_n log sum_{k in K_n} pi_k N(x_n | k), a lower bound of that log-likelihood.
    lower_bounds_ : list of float
        The lower bound at every iteration of the best initialisation.
    n_reseeded_ : int
        Components re-seeded because they emptied (see Notes).
    n_features_in_ : int

    Notes
    -----
    Numerics: all E-step arithmetic is on rows shifted by the weighted mean of the
    component means (about the data mean), so raw-scale data (values 0..255, norms
    ~500) keeps its float32 digits in |x|^2 - 2 x.mu + |mu|^2.

    Empty components: when a component's responsibility mass N_k drops below one
    sample, it is re-seeded on the worst-explained row of that E-step (lowest
    log-likelihood), with the average covariance of the other components and weight
    1/n. K therefore never shrinks (an IVF index keeps nlist lists), up to
    ``n_components`` re-seeds per initialisation: beyond, components that keep emptying
    (K near the number of distinct rows) stay as EM leaves them, as in scikit-learn. The lower bound
    never decreases by more than round-off except across a re-seed; an iteration that
    re-seeds is never taken as converged. That holds while ``reg_covar`` is small against
    the variances: like scikit-learn, the M-step adds ``reg_covar`` to the maximising
    variances, which is then no longer the maximiser, and a large one can lower the bound
    by itself (measured on SIFT rows: 64 spherical components, reg_covar 1000, the bound
    falls by 0.49 nats in float64 and float32 alike; at 1e-6 and 108 it only rises). With the
    truncated E-step a re-seeded component also joins the candidate set of the row it was
    seeded on.

    On a GPU, over data cached there, every EM iteration after the first is replayed from a
    CUDA graph captured once per fit (``_graph``): the host then issues one launch per
    iteration instead of a few hundred.

    Truncated E-step: the candidate sets, (N, n_candidates) int32 indexed by row
    number, persist across the iterations of one fit (in an unlinked temporary file
    above 1 GiB); rows start from their nearest means. The data must come in the same
    order on every pass.
    """

    # The truncated E-step's state during a fit (None otherwise).
    _truncation = None
    _hints = None  # precision="candidates": each block's ``kernels.exact_candidates.Hints``, by offset

    def __init__(self, n_components=1, *, covariance_type="diag", tol=1e-3, reg_covar=1e-6, max_iter=100,
                 n_init=1, init_params="kmeans", weights_init=None, means_init=None, precisions_init=None,
                 random_state=None, warm_start=False, verbose=0, device="auto", chunk_size=262144,
                 cache_data="auto", compute_dtype="float32", precision="auto", variance_floor="auto", estep="auto",
                 n_candidates=8, n_neighbors=12):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.device = device
        self.chunk_size = chunk_size
        self.cache_data = cache_data
        self.compute_dtype = compute_dtype
        self.precision = precision
        self.variance_floor = variance_floor
        self.estep = estep
        self.n_candidates = n_candidates
        self.n_neighbors = n_neighbors

    # ------------------------------------------------------------------ validation
    # Accepted forms of every parameter (scikit-learn's declarative style), checked at fit.
    _parameter_constraints = {
        "n_components": [Integer(1)],
        "covariance_type": [Options(*COVARIANCE_TYPES)],
        "tol": [Real(0)],
        "reg_covar": [Real(0)],
        "max_iter": [Integer(0)],
        "n_init": [Integer(1, MAX_N_INIT)],
        "init_params": [Options(*INIT_METHODS)],
        "weights_init": [Instances(None, object, label="None or array-like")],
        "means_init": [Instances(None, object, label="None or array-like")],
        "precisions_init": [Instances(None, object, label="None or array-like")],
        "random_state": [Instances(None, np.random.Generator, np.random.RandomState), Integer(0, 2**32 - 1)],
        "warm_start": [Options(False, True)],
        "verbose": [Integer(0), Options(False, True)],
        "device": [Options(*DEVICES)],
        "chunk_size": [Integer(1)],
        "cache_data": [Options(*CACHE_DATA)],
        "compute_dtype": [Options(*COMPUTE_DTYPES)],
        "precision": [Options("auto", *kernels.PRECISIONS)],
        "variance_floor": [Options("auto"), Real(0)],
        "estep": [Options(*ESTEPS)],
        "n_candidates": [Integer(1)],
        "n_neighbors": [Integer(1)],
    }

    def _check_parameters(self):
        validate_params(self._parameter_constraints, self.get_params(deep=False), type(self).__name__)
        if self.estep == "truncated" and self.covariance_type == "full":
            raise ValueError("estep='truncated' supports covariance_type 'diag' and 'spherical', not 'full'; "
                             "use estep='dense'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device; use device='auto' or 'cpu'")

    def _check_initial_parameters(self, n_features):
        """weights_init, means_init and precisions_init against the model's shapes and meaning
        (the messages quote scikit-learn's, which callers may match)."""
        k, d, cov = self.n_components, n_features, self.covariance_type
        if self.weights_init is not None:
            w = _init_array(self.weights_init, "weights_init", "weights", (k,))
            if (w < 0).any() or (w > 1).any():
                raise ValueError(f"The parameter 'weights' should be in the range [0, 1], but got min value "
                                 f"{w.min():.5f}, max value {w.max():.5f} (weights_init)")
            if abs(w.sum() - 1) > 1e-6:
                raise ValueError(f"The parameter 'weights' should be normalized, but got sum(weights) = "
                                 f"{w.sum():.5f} (weights_init)")
        if self.means_init is not None:
            _init_array(self.means_init, "means_init", "means", (k, d))
        if self.precisions_init is not None:
            shape = {"spherical": (k,), "diag": (k, d), "full": (k, d, d)}[cov]
            p = _init_array(self.precisions_init, "precisions_init", f"{cov} precision", shape)
            if cov != "full":
                if (p <= 0).any():
                    raise ValueError(f"precisions_init: '{cov} precision' should be positive; first bad component "
                                     f"{int(np.argwhere(p <= 0)[0][0])}")
                return
            asymmetric = ~np.isclose(p, p.transpose(0, 2, 1), rtol=1e-10, atol=0).all(axis=(1, 2))
            not_pd = np.array([np.linalg.eigvalsh(m).min() <= 0 for m in p])
            bad = np.flatnonzero(asymmetric | not_pd)
            if bad.size:
                raise ValueError(f"precisions_init: '{cov} precision' should be symmetric, positive-definite; "
                                 f"{bad.size} component(s) are not, the first is {int(bad[0])}")

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _truncates(self) -> bool:
        """Whether fitting uses the truncated E-step ('auto' resolved)."""
        if self.estep == "auto":
            return self.n_components >= AUTO_TRUNCATED_MIN and self.covariance_type != "full"
        return self.estep == "truncated"

    def _uses_kernels(self, device) -> bool:
        return device.type == "cuda" and self.compute_dtype == "float32" and self.covariance_type != "full"

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None):
        """Estimate the parameters by EM.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            ndarray, np.memmap, h5py.Dataset or torch.Tensor; read ``chunk_size`` rows at a
            time, so a memmap or h5py dataset is never loaded whole. uint8/int/float16/float32/
            float64 and non-contiguous arrays are accepted.
        y : ignored

        Returns
        -------
        self
        """
        self._check_parameters()
        return self._fit(ChunkSource(as_rows(X), self.chunk_size))

    def fit_predict(self, X, y=None):
        """Fit, then return the most probable component of every row of X, shape (n_samples,), int64."""
        return self.fit(X).predict(X)

    def fit_stream(self, chunks):
        """Estimate the parameters by EM over data that arrives in chunks.

        Parameters
        ----------
        chunks : callable returning an iterable of arrays of shape (n_i, n_features), or a
            list of such arrays. EM reads the data once per iteration, so a callable is
            called once per pass (e.g. ``lambda: (f["x"][i:i + m] for i in range(0, n, m))``).

        Returns
        -------
        self
        """
        self._check_parameters()
        return self._fit(ChunkSource(chunks, self.chunk_size))

    def _fit(self, source: ChunkSource):
        n = source.validate()
        if n == 0:
            raise ValueError("X has 0 samples; at least one is required")
        if source.n_features == 0:
            raise ValueError(f"X has 0 feature(s) (shape=({n}, 0)) while a minimum of 1 is required.")
        if source.max_abs > MAX_ABS_VALUE:
            raise ValueError(f"X holds values up to |x| = {source.max_abs:.3g}; GaussianMixture fits data with "
                             f"|x| <= {MAX_ABS_VALUE:g} (squared distances of larger values overflow or lose every "
                             "digit): rescale X")
        if n < self.n_components:
            raise ValueError(f"n_components={self.n_components} must be <= n_samples={n}")
        if self.covariance_type == "full" and source.n_features > 256:
            warnings.warn(f"covariance_type='full' with {source.n_features} features costs O(K D^2) per row")
        self._check_initial_parameters(source.n_features)
        device = self._device()
        fitted = hasattr(self, "means_")
        # A warm start continues the fitted model; any other fit starts afresh, whatever was fitted.
        if self.warm_start and fitted and self.means_.shape[1] != source.n_features:
            raise ValueError(f"X has {source.n_features} features, but the model was fitted with "
                             f"{self.means_.shape[1]} (warm_start=True continues it)")
        if device.type == "cuda":
            source = self._cached(source, device)
        do_init = not (self.warm_start and fitted)
        rng = _rng(self.random_state)
        best = None
        iterations = {True: self._em_iteration(source, device, n, reseed=True)}
        for _ in range(self.n_init if do_init else 1):
            iteration = iterations[True]
            state = self._initialize(source, rng, device) if do_init else self._state(device)
            self._truncation = TruncatedEStep(n, self.n_components, source.n_features, self.n_candidates,
                                              self.n_neighbors) if self._truncates() else None
            self._hints = {}
            lower_bound = -math.inf if do_init else self.lower_bound_
            bounds, converged, reseeded_total, n_iter = [], False, 0, 0
            bar = tqdm(total=self.max_iter, desc="EM", disable=not self.verbose, leave=False)
            for n_iter in range(1, self.max_iter + 1):
                previous = lower_bound
                # Nothing is queued behind an iteration after which the rows may be grouped: the
                # grouping's order is then the one its own E-step found, whether replayed or not
                # (later initialisations sample the grouped rows), and the queued one would be dropped.
                more = n_iter < self.max_iter and n_iter not in GROUP_ROWS_AFTER
                state, log_lik, reseeded = iteration(state, more=more)
                if n_iter in GROUP_ROWS_AFTER and self._group_rows(source):
                    # A captured iteration would replay the exact pass set up for rows in their
                    # given order (``kernels.candidate_resp.walk``): capture it again.
                    reseeding = iteration is iterations[True]
                    iterations = {key: self._em_iteration(source, device, n, reseed=key) for key in iterations}
                    iteration = iterations[reseeding]
                lower_bound = log_lik / n
                bounds.append(lower_bound)
                reseeded_total += reseeded
                if reseeded_total >= self.n_components and iteration is iterations[True]:
                    # Components that keep emptying (K near the number of distinct rows) would be
                    # re-seeded forever: from here on they stay as EM leaves them.
                    if False not in iterations:
                        iterations[False] = self._em_iteration(source, device, n, reseed=False)
                    iteration = iterations[False]
                bar.update()
                bar.set_postfix(lower_bound=f"{lower_bound:.6g}")
                if abs(lower_bound - previous) < self.tol and not reseeded:
                    converged = True
                    break
            bar.close()
            if best is None or lower_bound > best[0]:
                best = (lower_bound, state, converged, n_iter, bounds, reseeded_total)
        lower_bound, state, converged, n_iter, bounds, reseeded_total = best
        self._truncation, self._hints = None, None
        _check_fitted_state(state, lower_bound, self.covariance_type)
        if not converged:
            warnings.warn("Best performing initialization did not converge. Try different init parameters, or increase "
                          f"max_iter, tol, or check for degenerate data. (EM ran max_iter={self.max_iter} iterations; "
                          f"the lower bound still changed by more than tol={self.tol})", ConvergenceWarning)
        self._set_state(state)
        self.converged_, self.n_iter_, self.lower_bound_ = converged, n_iter, float(lower_bound)
        self.lower_bounds_, self.n_reseeded_ = bounds, reseeded_total
        self.n_features_in_ = source.n_features
        return self

    def _cached(self, source, device):
        """The data on the GPU, copied once (``cache_data``), or ``source`` itself to stream.

        The dense kernels never hold a (rows, K) block, so a cached copy is read in blocks of
        at least ``CACHED_KERNEL_BLOCK`` rows: every block ends in a partly filled wave of
        programs (at N=1M, K=1024 on an H100, four 262,144-row blocks took 3.7 ms against
        3.3 ms in one).
        """
        if self.cache_data is False:
            return source
        budget = math.inf if self.cache_data is True else CACHE_FREE_FRACTION * torch.cuda.mem_get_info(device)[0]
        rows = max(self.chunk_size, CACHED_KERNEL_BLOCK) if self._dense_kernels(device) else None
        return device_copy(source, device, budget, chunk_size=rows) or source

    def _kernel_precision(self) -> str:
        """``precision`` with 'auto' resolved."""
        return "candidates" if self.precision == "auto" else self.precision

    def _dense_kernels(self, device) -> bool:
        return self._uses_kernels(device) and not self._truncates()

    def _graphable(self, source, device) -> bool:
        """Whether an EM iteration can be replayed from a CUDA graph (``_graph``): dense or
        'candidates' kernels over one checked tensor already on the GPU, so that nothing in it
        reads the host (an unchecked source tests every block for NaN, a host read)."""
        return self._dense_kernels(device) and source.checked and source.resident_on(device)

    def _em_iteration(self, source, device, n, reseed):
        """``iteration(state, more=False) -> (state, log_lik, n_reseeded)``, the last two numbers read from
        the device, the iteration's one host read; ``reseed``: whether emptied components are
        re-seeded.

        Nothing in it waits for the GPU, so where ``_graphable`` it is captured and replayed
        (``_graph.GraphedStep``). A captured 'candidates' E-step has sizes fixed in advance
        (``kernels.exact_candidates.Hints``); where they fall short, the iteration runs again
        host-sized, which grows them, and is captured again, at most ``MAX_CAPTURES`` times a fit."""
        def step(*tensors):
            state = EMState(*tensors)
            stats, log_lik, worst = self._e_step(source, state, device)
            state, reseeded = self._m_step(stats, worst if reseed else worst[:0], state, n)
            return (*state, torch.stack([log_lik, reseeded.to(log_lik.dtype), self._short(device).to(log_lik.dtype)]))

        captures = MAX_CAPTURES if self._graphable(source, device) else 0

        def capture():
            nonlocal captures
            captures -= 1
            return GraphedStep(step) if captures >= 0 else step

        run = capture()
        ahead = None  # (state, outputs): the iteration from ``state``, queued before ``state`` was returned

        def iteration(state, more=False):
            """``more``: whether another iteration may follow, which a replayed one then queues on the
            GPU before it reads its numbers, so that the GPU does not wait for the host to decide (if
            EM stops here or this iteration runs again, the queued one is dropped)."""
            nonlocal run, ahead
            queued, ahead = ahead, None
            *tensors, read = queued[1] if queued is not None and queued[0] is state else run(*state)
            state_out = EMState(*tensors)
            if more and run is not step:  # replayed
                numbers = read.to("cpu", non_blocking=True)
                copied = torch.cuda.Event() if read.is_cuda else None
                if copied is not None:
                    copied.record()
                ahead = (state_out, run(*state_out))
                if copied is not None:
                    copied.synchronize()
                read = numbers
            log_lik, reseeded, short = read.tolist()
            if short:
                ahead = None
                *tensors, read = step(*state)
                log_lik, reseeded, _ = read.tolist()
                run = capture()
                state_out = EMState(*tensors)
            return state_out, log_lik, int(reseeded)

        return iteration

    def _group_rows(self, source):
        """Reorder the rows of each block of the library's own device copy by their best
        component, in place ('candidates' E-steps, after their first).

        Rows that share components then sit side by side: the exact pass's programs read the
        same components' parameters, and the statistics, summed component by component, read
        neighbouring rows. H100, N = 1M, D = 128 byte rows, K = 1024, GPU busy ms per EM
        iteration in the given order against grouped: diag 4.45 / 4.19, spherical 3.33 / 3.16
        (eval/results/bench_fit_profile_group_*_h100.json). Only a copy is reordered (the
        caller's rows never are), and the order never leaves the fit: the model does not depend
        on it but for the rounding of sums. A block takes a transient copy of itself: where the
        device has no room for it, that block and the rest stay as they are. Returns whether a
        block was reordered."""
        if not (self._hints and source.owned):
            return False
        moved = False
        for offset, hints in self._hints.items():
            order = torch.argsort(hints.best)
            try:
                source.permute_rows_(offset, order)
            except torch.cuda.OutOfMemoryError:
                break
            hints.best.copy_(hints.best[order])
            hints.grouped = moved = True
        return moved

    def _short(self, device) -> torch.Tensor:
        """Pairs and rows the last 'candidates' E-steps found no room for (0-d; 0 for the others)."""
        short = [h.short for h in (self._hints or {}).values()]
        return torch.stack(short).sum() if short else torch.zeros((), dtype=torch.int64, device=device)

    def _initialize(self, source, rng, device):
        k = self.n_components
        if self.means_init is not None:
            seeds = np.asarray(self.means_init, dtype=np.float64)
            shift = seeds.mean(0)
        else:
            sample = uniform_sample(source, sample_size(k, source.n_features), rng)
            seeds = None if self.init_params == "random" else initial_means(sample, k, self.init_params, rng)
            shift = sample.mean(0, dtype=np.float64) if seeds is None else seeds.mean(0)
        shift = torch.as_tensor(shift, device=device)
        # With weights, means and precisions all given, the first pass (O(N K D)) would be
        # thrown away: skip it.
        if any(given is None for given in (self.weights_init, self.means_init, self.precisions_init)):
            if seeds is None:
                stats = self._random_responsibility_stats(source, shift, rng, device)
            else:
                stats = self._hard_assignment_stats(source, torch.as_tensor(seeds, device=device) - shift, shift,
                                                    device)
            weights, means, cov = m_step(stats, self.covariance_type, self.reg_covar, self._relative_floor())
        if self.weights_init is not None:
            weights = torch.as_tensor(np.asarray(self.weights_init, dtype=np.float64), device=device)
        if self.means_init is not None:
            means = torch.as_tensor(seeds, device=device) - shift
        if self.precisions_init is not None:
            prec = torch.as_tensor(np.asarray(self.precisions_init, dtype=np.float64), device=device)
            cov = 1.0 / prec if self.covariance_type != "full" else torch.linalg.inv(prec)
        return self._recentre(EMState(weights, means, cov, None, shift))

    def _random_responsibility_stats(self, source, shift, rng, device) -> EStepResult:
        """Statistics of responsibilities drawn uniformly and normalised per row."""
        k, d = self.n_components, shift.shape[0]
        acc = _zero_stats(k, d, self.covariance_type, device)
        for _, x in self._blocks(source, device, "init"):
            r = torch.as_tensor(rng.random((x.shape[0], k)), device=device)
            r /= r.sum(1, keepdim=True)
            xc = x.to(torch.float64) - shift
            acc.nk.add_(r.sum(0))
            acc.s1.add_(r.T @ xc)
            if self.covariance_type == "spherical":
                acc.s2.add_(r.T @ (xc * xc).sum(1))
            elif self.covariance_type == "diag":
                acc.s2.add_(r.T @ (xc * xc))
            else:
                acc.s2.add_((r.T @ (xc[:, :, None] * xc[:, None, :]).reshape(len(xc), d * d)).view(k, d, d))
        return acc

    def _hard_assignment_stats(self, source, seeds_c, shift, device) -> EStepResult:
        """Statistics of assigning every row to its nearest seed (one-hot responsibilities)."""
        k, d = seeds_c.shape
        nearest = kernels.natural_params(torch.ones(k, dtype=torch.float64, device=device) / k, seeds_c,
                                         torch.ones(k, dtype=torch.float64, device=device))
        acc = _zero_stats(k, d, self.covariance_type, device)
        for _, x in self._blocks(source, device, "init"):
            labels = self._best_components(x, nearest, shift)
            xc = x.to(torch.float64) - shift
            acc.nk.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
            acc.s1.index_add_(0, labels, xc)
            if self.covariance_type == "spherical":
                acc.s2.index_add_(0, labels, (xc * xc).sum(1))
            elif self.covariance_type == "diag":
                acc.s2.index_add_(0, labels, xc * xc)
            else:
                acc.s2.index_add_(0, labels, xc[:, :, None] * xc[:, None, :])
        return acc

    def _e_step(self, source, state, device):
        """One pass: summed statistics, summed log-likelihood (a 0-d tensor), and the
        worst-explained rows, worst first."""
        params = self._kernel_params(state, device)
        # Summed on the device (a host read per block would stall the stream of blocks), into the
        # first block's own results (every E-step returns fresh tensors).
        acc = log_lik = None
        worst = None  # (log Z, rows, global indices) of the worst rows so far
        if self._truncation is not None:
            self._truncation.begin_pass(state.means + state.shift)
        for offset, x in self._blocks(source, device, "E-step"):
            res = self._estep_block(x, params, state.shift, offset)
            if acc is None:
                acc = EStepResult(None, *(t.to(torch.float64) for t in res[1:]))
                log_lik = res.log_norm.sum(dtype=torch.float64)
            else:
                for total, part in zip(acc[1:], res[1:]):
                    total += part
                log_lik += res.log_norm.sum(dtype=torch.float64)
            # Ranked in float32: a radix select makes half the passes of float64's (H100, N = 1M:
            # its digit sums 0.07 against 0.13 ms an iteration), and which of two rows within 1e-7
            # of each other is the worse explained does not matter to a re-seed.
            low = _lowest(res.log_norm.float(), min(RESEED_CANDIDATES, x.shape[0]))
            block = (res.log_norm[low].to(torch.float64), x[low].to(torch.float64), low + offset)
            if worst is not None:
                block = tuple(torch.cat(pair) for pair in zip(worst, block))
                keep = torch.topk(block[0], min(RESEED_CANDIDATES, len(block[0])), largest=False).indices
                block = tuple(t[keep] for t in block)
            worst = block
        if acc is None:  # no rows (a rank of a data-parallel fit may hold none)
            k, d = state.means.shape
            acc, log_lik = _zero_stats(k, d, self.covariance_type, device), torch.zeros((), dtype=torch.float64,
                                                                                        device=device)
            worst = (torch.empty(0, dtype=torch.float64, device=device),
                     torch.empty(0, d, dtype=torch.float64, device=device),
                     torch.empty(0, dtype=torch.int64, device=device))
        worst_ll, worst_rows, worst_at = worst
        order = torch.argsort(worst_ll)
        if self._truncation is not None:
            self._truncation.worst_rows = worst_at[order]
        return acc, log_lik, worst_rows[order]

    def _relative_floor(self) -> float:
        """``variance_floor`` resolved: 'auto' is what the E-step's arithmetic needs."""
        if not isinstance(self.variance_floor, str):
            return float(self.variance_floor)
        return FLOAT32_RELATIVE_FLOOR if self.compute_dtype == "float32" else 0.0

    def _m_step(self, stats, worst_rows, state, n):
        """New state, and the number of re-seeded components (a 0-d tensor).

        Empty components, in index order, take the worst rows, worst first, as far as they
        go; computed with masks, so that nothing waits for the GPU. Where the E-step runs the
        kernels, so does the M-step (``kernels.m_step``: the same arithmetic in two launches)."""
        if self._truncation is None and self._uses_kernels(stats.nk.device):
            *params, shift, reseeded = kernels.m_step(stats, worst_rows, state.shift, n, self.reg_covar,
                                                      self._relative_floor(), self.compute_dtype != "float64")
            return EMState(*params, shift), reseeded
        weights, means, cov = m_step(stats, self.covariance_type, self.reg_covar, self._relative_floor())
        empty = stats.nk < EMPTY_MASS
        rank = torch.cumsum(empty, 0) - 1
        reseed = empty & (rank < worst_rows.shape[0])
        if worst_rows.shape[0]:
            means = torch.where(reseed[:, None], worst_rows[rank.clamp(0, worst_rows.shape[0] - 1)] - state.shift,
                                means)
            kept = ~reseed
            per_comp = (-1,) + (1,) * (cov.dim() - 1)
            kept_mean = (cov * kept.view(per_comp)).sum(0) / kept.sum().clamp_min(1)
            cov = torch.where(reseed.view(per_comp) & kept.any(), kept_mean, cov)
            reseeded_weights = torch.where(reseed, 1.0 / n, weights)
            weights = torch.where(reseed.any(), reseeded_weights / reseeded_weights.sum(), weights)
        if self._truncation is not None and bool(reseed.any()):
            self._truncation.plant(torch.nonzero(reseed).flatten())
        return self._recentre(EMState(weights, means, cov, None, state.shift)), reseed.sum()

    def _recentre(self, state):
        """Move the shift to the weighted mean of the means; fill in precisions_cholesky."""
        # float32 E-steps: a float32-representable shift, which the kernels subtract in float32
        # exactly. float64 ones keep it as it is: rounded, data far from the origin (1e15) would
        # sit ~1e7 from it, and the variances (E[x^2] - mean^2 about the shift) lose their digits.
        shift = state.shift + state.weights @ state.means
        if self.compute_dtype != "float64":
            shift = shift.float().double()
        return EMState(state.weights, state.means - (shift - state.shift), state.cov,
                      precisions_cholesky(state.cov, self.covariance_type), shift)

    def _kernel_params(self, state, device, dtype=None, centres=None):
        """The E-step's parameters in ``dtype`` (default: ``compute_dtype``); diag and spherical
        ones carry the means in the data's coordinates (``centres``, default the state's)."""
        if dtype is None:
            dtype = torch.float64 if self.compute_dtype == "float64" else torch.float32
        if centres is None and dtype == torch.float32 and self._uses_kernels(state.means.device) \
                and torch.device(device).type == state.means.device.type:
            # One launch where the torch operations below are some 20 (``kernels.estep_params``).
            return float32_natural_params(state.weights, state.means, state.cov, state.shift)
        params = kernel_params(state.weights, state.means, state.cov, state.prec_chol, self.covariance_type)
        if isinstance(params, NaturalParams):
            params = params._replace(centres=state.means + state.shift if centres is None else centres)
        return params.to(device=device, dtype=dtype)

    def _estep_block(self, x, params, shift, offset=None) -> EStepResult:
        """E-step of one block; ``offset`` (its first row's global index) keys the truncated
        E-step's candidate sets and the exact-on-candidates E-step's best components (its
        thresholds' hints: EM's parameters move little between iterations), and is ignored by
        the dense one."""
        if self._truncation is not None:
            return self._truncation.block(offset, x, params, shift, dtype=params[0].dtype)
        if self._uses_kernels(x.device):
            hints = None
            precision = self._kernel_precision()
            if precision == "candidates" and self._hints is not None and offset is not None:
                hints = kernels.candidate_hints(self._hints, offset, x, params, shift)
            return kernels.estep(x, params, shift, precision=precision, hints=hints)
        return kernels.reference.estep(x, params, shift, dtype=params[0].dtype)

    def _best_components(self, x, params, shift) -> torch.Tensor:
        if self._uses_kernels(x.device):
            return kernels.log_norm(x, params.to(dtype=torch.float32), shift,
                                    precision=self._kernel_precision())[1].long()
        return self._weighted_log_prob(x, params, shift, reduce=lambda ll: ll.argmax(1))

    def _weighted_log_prob(self, x, params, shift, reduce=None):
        """(rows, K) log pi_k + log N(x_n | k), computed in the E-step's blocks of rows; with
        ``reduce`` (a sub-block -> one value per row) only the reduced values are kept, so that
        predict and score never hold a (chunk_size, K) matrix (17 GB at K = 16,384)."""
        dtype = params[0].dtype
        out = []
        rows = kernels.reference.block_rows(len(params[0]), x.shape[1], self.covariance_type == "full", dtype)
        for start in range(0, x.shape[0], rows):
            ll = kernels.reference.weighted_log_prob(x[start:start + rows], params, shift, dtype=dtype)
            out.append(ll if reduce is None else reduce(ll))
        return torch.cat(out)

    def _blocks(self, source, device, what):
        """``(offset, x)`` over the source, x on ``device`` (pinned and prefetched on CUDA, see
        ``_chunks.device_blocks``), with a progress bar at verbose >= 2."""
        return tqdm(device_blocks(source, device), desc=what, disable=self.verbose < 2, leave=False, unit="chunk")

    # ------------------------------------------------------------------ state <-> attributes
    def _set_state(self, state):
        self.weights_ = state.weights.cpu().numpy()
        self.means_ = (state.means + state.shift).cpu().numpy()
        self.covariances_ = state.cov.cpu().numpy()
        self._set_precisions()

    def _set_precisions(self):
        """precisions_cholesky_ and precisions_ from covariances_."""
        cov = torch.as_tensor(self.covariances_)
        prec_chol = precisions_cholesky(cov, self.covariance_type)
        self.precisions_cholesky_ = prec_chol.numpy()
        self.precisions_ = (prec_chol @ prec_chol.transpose(1, 2)).numpy() \
            if self.covariance_type == "full" else 1.0 / self.covariances_

    def _state(self, device):
        self._check_fitted()
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)  # noqa: E731
        shift = t(self.weights_ @ self.means_)
        return self._recentre(EMState(t(self.weights_), t(self.means_) - shift, t(self.covariances_), None, shift))

    def _check_fitted(self):
        if not hasattr(self, "means_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate "
                                 "arguments before using this estimator.")

    # ------------------------------------------------------------------ inference
    def _prepared_blocks(self, X):
        """Validated blocks ``(offset, x, params, shift)`` of X on the model's device."""
        self._check_fitted()
        self._check_parameters()
        device = self._device()
        state = self._state(device)
        # The fitted means themselves, not the state's (relative to a recentred shift, rounded).
        centres = torch.as_tensor(self.means_, dtype=torch.float64, device=device)
        params = self._kernel_params(state, device, centres=centres)
        wide = params if params[0].dtype == torch.float64 else None
        prec_max = _largest_precisions(state.cov, self.covariance_type, self.means_.shape[1])
        X = as_rows(X)
        if len(X.shape) == 2 and X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input")
        source = ChunkSource(X, self.chunk_size)
        source.n_features = self.n_features_in_
        if source.validate() == 0:
            raise ValueError("X has 0 samples; at least one is required")
        for offset, x in device_blocks(source, device):
            # The largest Mahalanobis term a row of this block can reach (about the shift):
            # rows far out overflow float32 log-densities, so such a block is computed in
            # float64, and one too far out for float64 is refused.
            xc = x.to(torch.float64) - state.shift
            reach = float(((xc * xc) @ prec_max).max())
            # The float32 design holds x**2 itself: rows beyond ~1e19 overflow it whatever the variances.
            far = float((xc * xc).sum(1).max()) > FLOAT32_REACH
            if reach > FLOAT64_REACH:
                row = int(((xc * xc) @ prec_max).argmax())
                raise ValueError(f"X row {offset + row} lies too far from every component for float64 log-densities "
                                 f"(squared Mahalanobis distance ~{reach:.3g}): rescale X as the training data")
            # Precisions beyond float32 (variances below ~1e-30: data of that scale with
            # reg_covar=0) overflow the float32 parameters themselves.
            far = far or reach > FLOAT32_REACH or float(prec_max.max()) > FLOAT32_REACH
            if far and wide is None:
                wide = self._kernel_params(state, device, torch.float64, centres=centres)
            yield offset, x, (wide if far else params), state.shift

    def _scan(self, X, per_block):
        """Apply ``per_block(x, params, shift)`` over the blocks of X; concatenate on the host."""
        blocks = self._prepared_blocks(X)
        return torch.cat([per_block(x, params, shift).cpu() for _, x, params, shift in blocks]).numpy()

    def iter_weighted_log_prob(self, X):
        """Yield ``(offset, block)`` with block[i, k] = log pi_k + log N(x_{offset+i} | mu_k, Sigma_k).

        Blocks are float32/float64 torch tensors (``compute_dtype``) of at most
        ``chunk_size`` rows and ~256 MB on the model's device, so the n x K matrix is never
        held whole: consumers (soft assignment, posterior probing) reduce each block, e.g.
        to its top few components, before asking for the next.
        """
        rows = max(1, LOG_PROB_BLOCK_BYTES // (8 * self.n_components))
        for offset, x, params, shift in self._prepared_blocks(X):
            for start in range(0, x.shape[0], rows):
                yield offset + start, self._weighted_log_prob(x[start:start + rows], params, shift)

    def score_samples(self, X):
        """Log-likelihood log p(x_n) of every row, shape (n_samples,), float64."""
        def block(x, params, shift):
            if self._uses_kernels(x.device) and params[0].dtype == torch.float32:
                return kernels.log_norm(x, params, shift, precision=self._kernel_precision())[0]
            return self._weighted_log_prob(x, params, shift, reduce=lambda ll: torch.logsumexp(ll, 1).double())
        return self._scan(X, block)

    def score(self, X, y=None):
        """Mean log-likelihood per sample."""
        return float(self.score_samples(X).mean())

    def predict(self, X):
        """Most probable component of every row, shape (n_samples,), int64."""
        def block(x, params, shift):
            if params[0].dtype == torch.float32:
                return self._best_components(x, params, shift)
            # float64 (compute_dtype, or a block of far-out rows, see _prepared_blocks)
            return self._weighted_log_prob(x, params, shift, reduce=lambda ll: ll.argmax(1))
        return self._scan(X, block)

    def predict_proba(self, X):
        """Responsibilities, shape (n_samples, n_components), float64 (materialises n x K: the caller asked)."""
        def block(x, params, shift):
            ll = self._weighted_log_prob(x, params, shift).double()
            p = torch.exp(ll - torch.logsumexp(ll, 1, keepdim=True))
            # Rows far from every component have log-densities so large (~1e30 and beyond) that
            # ll - logsumexp rounds to 0 for several components: normalise so every row sums to 1.
            return p / p.sum(1, keepdim=True)
        return self._scan(X, block)

    def bic(self, X):
        """Bayesian information criterion on X (lower is better)."""
        ll = self.score_samples(X)
        return -2 * ll.sum() + self._n_parameters() * math.log(ll.shape[0])

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * self.score_samples(X).sum() + 2 * self._n_parameters()

    def _n_parameters(self):
        return n_parameters(self.n_components, self.means_.shape[1], self.covariance_type)

    def sample(self, n_samples=1):
        """Draw samples; returns X of shape (n_samples, n_features) and their components y."""
        self._check_fitted()
        validate_params({"n_samples": [Integer(1)]}, {"n_samples": n_samples}, "Invalid value for 'n_samples'")
        rng = _rng(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_ / self.weights_.sum())
        d = self.means_.shape[1]
        xs = []
        for k, (mean, count) in enumerate(zip(self.means_, counts)):
            z = rng.standard_normal((count, d))
            if self.covariance_type == "full":
                xs.append(mean + z @ np.linalg.cholesky(self.covariances_[k]).T)
            else:
                xs.append(mean + z * np.sqrt(self.covariances_[k]))
        return np.vstack(xs), np.repeat(np.arange(self.n_components), counts)

    @classmethod
    def from_parameters(cls, weights, means, covariances, **params):
        """A fitted mixture with the given parameters and no EM, e.g. the per-list statistics of a k-means partition.

        Parameters
        ----------
        weights : array-like of shape (K,), >= 0, summing to 1
        means : array-like of shape (K, D)
        covariances : array-like of shape (K,), (K, D) or (K, D, D) for covariance_type
            'spherical', 'diag' or 'full'; positive (definite)
        **params
            Constructor arguments (covariance_type, device, ...).

        Returns
        -------
        GaussianMixture, fitted (``n_iter_`` 0, ``converged_`` False, ``lower_bound_`` -inf).
        """
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be 2-D (K, D), got shape {means.shape}")
        k, d = means.shape
        gmm = cls(k, **params)
        gmm._check_parameters()
        means = _init_array(means, "means", "means", (k, d))
        weights = _init_array(weights, "weights", "weights", (k,))
        shape = {"spherical": (k,), "diag": (k, d), "full": (k, d, d)}[gmm.covariance_type]
        covariances = _init_array(covariances, "covariances", "covariances", shape)
        if (weights < 0).any() or abs(weights.sum() - 1) > 1e-6:
            raise ValueError(f"weights must be >= 0 and sum to 1, got sum {weights.sum()}")
        if gmm.covariance_type != "full" and not (covariances > 0).all():
            raise ValueError("covariances must be > 0")
        if (np.abs(means) > MAX_ABS_MEAN).any():
            row = int(np.flatnonzero((np.abs(means) > MAX_ABS_MEAN).any(axis=1))[0])
            raise ValueError(f"means of component {row} exceed {MAX_ABS_MEAN:g} in magnitude: GaussianMixture models "
                             f"data with |x| <= {MAX_ABS_VALUE:g}")
        gmm.weights_, gmm.means_, gmm.covariances_ = weights, means, covariances
        gmm._set_precisions()  # raises for a 'full' covariance that is not positive definite
        gmm.converged_, gmm.n_iter_, gmm.lower_bound_, gmm.lower_bounds_ = False, 0, -math.inf, []
        gmm.n_reseeded_, gmm.n_features_in_ = 0, d
        return gmm

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Write the fitted model to ``path``: .npz of plain arrays, a versioned JSON header, a SHA-256."""
        from ._io import save_mixture
        save_mixture(self, path)

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; corrupt, truncated or edited files raise ValueError."""
        from ._io import load_mixture
        return load_mixture(cls, path)


def _check_fitted_state(state, lower_bound, covariance_type):
    """Refuse a fit whose parameters are not a model (a variance of 0 with reg_covar=0, a NaN
    from an overflow) instead of storing it."""
    cov = state.cov if covariance_type != "full" else torch.linalg.eigvalsh(state.cov)
    bad = ~(torch.isfinite(cov) & (cov > 0)).reshape(cov.shape[0], -1).all(1)
    bad |= ~torch.isfinite(state.means).all(1) | ~torch.isfinite(state.weights)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{ILL_DEFINED} ({int(bad.sum())} component(s) have a zero, negative or non-finite "
                         f"variance; the first is component {first})")
    if math.isnan(lower_bound):
        raise ValueError("fitting failed: the log-likelihood is NaN; increase reg_covar or rescale X")


def _largest_precisions(cov, covariance_type, n_features) -> torch.Tensor:
    """(D,) float64: per feature, the largest precision any component has along it (full: the
    largest eigenvalue of any precision matrix, for every feature)."""
    if covariance_type == "diag":
        return (1.0 / cov).max(0).values
    if covariance_type == "spherical":
        return torch.full((n_features,), float((1.0 / cov).max()), dtype=cov.dtype, device=cov.device)
    return torch.full((n_features,), float(1.0 / torch.linalg.eigvalsh(cov).min()), dtype=cov.dtype,
                      device=cov.device)


def _lowest(values: torch.Tensor, m: int, group: int = 512) -> torch.Tensor:
    """Indices of ``m`` smallest of the 1-D ``values`` (ties: any of them), in no given order.

    The ``m`` groups of ``group`` consecutive values with the smallest minima hold ``m`` smallest
    values: with t the m-th smallest, fewer than m values lie below t, so fewer than m groups have a
    minimum below t, all of them taken, and every other taken group has one at t. Each taken group
    gives at most ``m`` of them, so its ``m`` smallest are enough. On a GPU these are small sorts and
    selects of one block each (a 2,048-value sort for 2^20 rows), where torch.topk over all values
    is a multi-block radix select of about 20 launches and a single-block one is slow (its radix
    takes 2 bits a pass: H100, two selects over 2,048 and 16,384 values took 0.10 ms,
    ``eval/results/bench_fit_profile_8fe7596_k256_h100.json``)."""
    n = len(values)
    if n <= m * group or m > group:
        return torch.topk(values, m, largest=False).indices
    groups = torch.nn.functional.pad(values, (0, -n % group), value=math.inf).view(-1, group)
    chosen = torch.sort(groups.amin(1)).indices[:m]
    top = torch.topk(groups[chosen], m, dim=1, largest=False)
    best = torch.sort(top.values.flatten()).indices[:m]
    return (chosen[:, None] * group + top.indices).flatten()[best]


def _zero_stats(k, d, covariance_type, device) -> EStepResult:
    f64 = dict(dtype=torch.float64, device=device)
    s2_shape = {"spherical": (k,), "diag": (k, d), "full": (k, d, d)}[covariance_type]
    return EStepResult(None, torch.zeros(k, **f64), torch.zeros(k, d, **f64), torch.zeros(s2_shape, **f64))


def _rng(random_state) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(2**31 - 1))
    return np.random.default_rng(random_state)


def _init_array(value, name, label, shape):
    """An initial parameter as float64 of ``shape``, finite (``label``: scikit-learn's name for it)."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array of numbers: {err}") from err
    if a.shape != shape:
        raise ValueError(f"The parameter '{label}' should have the shape of {shape}, but got {a.shape} ({name})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinity (first at flat index {int(np.argmin(np.isfinite(a)))})")
    return a
