"""Data-parallel EM over ``torch.distributed``: one all-reduce of the sufficient statistics per iteration.

GMM sufficient statistics are sums over rows, so every rank runs the ordinary E-step on
its own shard, the ranks sum N_k, S1, S2 and the log-likelihood in one all-reduce, and all
run the same float64 M-step. The result equals the single-process fit up to the order of
the float64 additions (1e-12 relative or so on the means).

Launch with ``torchrun`` (NCCL on GPUs, gloo on CPUs)::

    torchrun --nproc-per-node=8 -m flashgmm_ivf.cli train --distributed --data base.u8bin \\
        -k 4096 --checkpoint em.ckpt.npz --resume --save gmm.npz

or from Python, after :func:`init_distributed`::

    gmm = DistributedGaussianMixture(4096, max_iter=20, checkpoint="em.ckpt.npz", resume=True)
    gmm.fit(read_vectors("base.u8bin"))        # each rank reads only its row range

Rules that keep all ranks identical:

- Initialisation is computed on rank 0 and broadcast. Rank 0 sees exactly the sample the
  single-process fit would draw with the same ``random_state``: every rank draws the
  uniform keys of its rows from the same random stream advanced to its first row
  (``bit_generator.advance``), and the smallest keys over all ranks are gathered.
- Re-seeding of empty components picks the worst-explained rows over all ranks (their
  log-likelihoods are gathered, then sorted the same way everywhere).
- Checkpoints: after every iteration rank 0 writes the parameters, the iteration count
  and the lower-bound history to a versioned .npz (atomic rename, no pickle); a restarted
  job with ``resume=True`` reads it on rank 0, broadcasts it, and continues where it
  stopped, so a lost rank costs at most one iteration.

Without a process group, :class:`DistributedGaussianMixture` runs as one rank of one
(checkpointing included).
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ._chunks import ChunkSource
from ._init import initial_means, sample_size
from ._mstep import EMState, m_step, precisions_cholesky
from .mixture import EMPTY_MASS, RESEED_CANDIDATES, ConvergenceWarning, GaussianMixture

__all__ = ["Checkpoint", "DistributedGaussianMixture", "ShardSource", "init_distributed", "load_checkpoint",
           "save_checkpoint", "shard_range"]

CHECKPOINT_FORMAT = "flashgmm_ivf.EMCheckpoint"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------- process group
def init_distributed(backend=None, timeout_s=1800.0):
    """Join the process group that ``torchrun`` describes in the environment.

    Parameters
    ----------
    backend : {'nccl', 'gloo'} or None
        None: NCCL when CUDA is available, else gloo.
    timeout_s : float
        Collective timeout (a dead rank surfaces as an error after this long at most).

    Returns
    -------
    (rank, world_size) : tuple of int

    Notes
    -----
    With NCCL the rank's GPU is ``LOCAL_RANK`` (set as the current device, so
    ``device='cuda'`` means that GPU).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def shard_range(n, rank, world_size):
    """Rows ``[start, stop)`` of rank ``rank`` out of ``world_size``: contiguous, sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


class _Comm:
    """Collectives of the default process group; identities when there is none (one rank of one).

    Tensors travel on the backend's device (the rank's GPU for NCCL, the host for gloo)
    and come back on the device they were given on.
    """

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_reduce(self, t):
        """Sum of ``t`` over ranks."""
        if not self.active:
            return t
        buf = t.to(self.device).clone()
        dist.all_reduce(buf)
        return buf.to(t.device)

    def broadcast(self, t):
        """Rank 0's ``t`` (same shape and dtype on every rank)."""
        if not self.active:
            return t
        buf = t.to(self.device).clone()
        dist.broadcast(buf, src=0)
        return buf.to(t.device)

    def all_gather(self, t):
        """Concatenation along dim 0 of every rank's ``t`` (same shape on every rank), in rank order."""
        if not self.active:
            return t
        buf = t.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat(parts).to(t.device)

    def gather_rows(self, t):
        """Rank 0: every rank's ``t`` of shape (n_r, ...) concatenated in rank order; other ranks: None."""
        if not self.active:
            return t
        counts = self.all_gather(torch.tensor([t.shape[0]], dtype=torch.int64)).tolist()
        padded = torch.zeros((max(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[:t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)

    def broadcast_json(self, obj):
        """Rank 0's JSON-serialisable ``obj`` (other ranks pass anything)."""
        if not self.active:
            return obj
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8) if self.rank == 0 else None
        size = self.broadcast(torch.tensor([0 if data is None else data.numel()], dtype=torch.int64))
        buf = self.broadcast(data if data is not None else torch.zeros(int(size), dtype=torch.uint8))
        return json.loads(bytes(buf.numpy()).decode())


# ---------------------------------------------------------------------- data
class ShardSource(ChunkSource):
    """This rank's rows as blocks, plus the global row count and this rank's first global row.

    Parameters
    ----------
    data : as :class:`~flashgmm_ivf._chunks.ChunkSource` (array, list of blocks, or callable)
    chunk_size : int
    comm : _Comm
    rows : (start, stop) or None
        Read only rows ``[start, stop)`` of the array ``data`` (a memmap or h5py dataset is
        sliced one block at a time, never loaded whole). None: ``data`` is this rank's own.

    Attributes
    ----------
    n_total : int or None
        Rows over all ranks (after :meth:`validate`).
    offset : int or None
        Global index of this rank's first row: ranks are concatenated in rank order.
    """

    def __init__(self, data, chunk_size, comm, *, rows=None):
        if rows is None:
            super().__init__(data, chunk_size)
        else:
            start, stop = rows
            super().__init__(lambda: (data[i:min(i + chunk_size, stop)] for i in range(start, stop, chunk_size)),
                             chunk_size)
            self.n_features = int(data.shape[1])
        self.comm = comm
        self.n_total = None
        self.offset = None

    def validate(self):
        """Check every local block once; return the global row count (cached: one pass per fit)."""
        if self.n_total is None:
            self.n_total, self.offset = self._global_count()
        return self.n_total

    def _global_count(self):
        # A rank that fails must not leave the others waiting in a collective: every
        # rank reports (rows, features, failed) and all raise together.
        failure, n_local = None, 0
        try:
            n_local = super().validate()
        except (TypeError, ValueError) as err:
            failure = err
        d = -1 if self.n_features is None else self.n_features
        table = self.comm.all_gather(torch.tensor([[n_local, d, failure is not None]], dtype=torch.int64))
        failed = torch.nonzero(table[:, 2]).flatten().tolist()
        if failed:
            raise failure or RuntimeError(f"rank(s) {failed} could not read their shard (see their errors)")
        dims = sorted({int(v) for v in table[:, 1] if v >= 0})
        if len(dims) > 1:
            raise ValueError(f"ranks disagree on the number of features: {table[:, 1].tolist()}")
        self.n_features = dims[0] if dims else self.n_features
        counts = table[:, 0]
        return int(counts.sum()), int(counts[:self.comm.rank].sum())


# ---------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """EM state after an iteration: what a restarted job needs to continue identically.

    Attributes
    ----------
    weights : ndarray of shape (K,), float64
    means : ndarray of shape (K, D), float64, relative to ``shift``
    covariances : ndarray of shape (K,), (K, D) or (K, D, D), float64
    shift : ndarray of shape (D,), float64 (the E-step's centring point)
    covariance_type : str
    n_samples : int
        Rows of the data set the run is fitted on (a resumed run must see the same).
    n_iter : int
        EM iterations done.
    lower_bounds : list of float
        Lower bound of every iteration done.
    n_reseeded : int
    last_reseeded : bool
        Whether the last iteration re-seeded (such an iteration never counts as converged).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    shift: np.ndarray
    covariance_type: str
    n_samples: int
    n_iter: int
    lower_bounds: list
    n_reseeded: int
    last_reseeded: bool

    _ARRAYS = ("weights", "means", "covariances", "shift")

    def header(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "covariance_type": self.covariance_type, "n_samples": int(self.n_samples),
                "n_iter": int(self.n_iter), "lower_bounds": [float(b) for b in self.lower_bounds],
                "n_reseeded": int(self.n_reseeded), "last_reseeded": bool(self.last_reseeded),
                "shapes": {name: list(getattr(self, name).shape) for name in self._ARRAYS}}

    def converged(self, tol) -> bool:
        """The fit loop's stopping rule applied to the last two iterations."""
        b = self.lower_bounds
        return len(b) >= 2 and abs(b[-1] - b[-2]) < tol and not self.last_reseeded


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (a temporary file in the same folder, fsync, rename).

    A reader sees either the previous checkpoint or this one, never a partial file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = {name: np.ascontiguousarray(getattr(ckpt, name), dtype=np.float64) for name in Checkpoint._ARRAYS}
    with open(tmp, "wb") as f:
        np.savez(f, header=np.array(json.dumps(ckpt.header())), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    FileNotFoundError, or ValueError naming the file when it is corrupt, of another format
    or version, or its arrays disagree with its header.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ("header",) + Checkpoint._ARRAYS}
        header = json.loads(str(arrays.pop("header")))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a readable {CHECKPOINT_FORMAT} file (corrupt or truncated?): {err}") from err
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} file")
    if header.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: format_version {header.get('format_version')!r} is not supported "
                         f"(this library reads version {CHECKPOINT_VERSION})")
    try:
        for name, a in arrays.items():
            if a.dtype != np.float64 or list(a.shape) != header["shapes"][name] or not np.isfinite(a).all():
                raise ValueError(f"array {name!r} is {a.dtype}{a.shape}, header says float64{header['shapes'][name]}"
                                 " (or it holds NaN / infinity)")
        return Checkpoint(**arrays, covariance_type=header["covariance_type"], n_samples=header["n_samples"],
                          n_iter=header["n_iter"], lower_bounds=header["lower_bounds"],
                          n_reseeded=header["n_reseeded"], last_reseeded=header["last_reseeded"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed {CHECKPOINT_FORMAT} file: {err}") from err


@dataclass
class _Progress:
    """Iterations of the current EM run (a resumed run starts from its checkpoint's)."""

    n_iter: int = 0
    lower_bounds: list = field(default_factory=list)
    n_reseeded: int = 0
    last_reseeded: bool = False


# ---------------------------------------------------------------------- the estimator
class DistributedGaussianMixture(GaussianMixture):
    """:class:`~flashgmm_ivf.GaussianMixture` fitted by data-parallel EM over the default process group.

    Takes every GaussianMixture parameter, plus:

    Parameters
    ----------
    checkpoint : str or Path, optional
        Rank 0 writes the EM state here after every iteration (see :func:`save_checkpoint`).
        Requires ``n_init=1``.
    resume : bool, default=False
        If ``checkpoint`` exists, continue from it instead of initialising (same data,
        n_components and covariance_type required); the result equals the uninterrupted
        run's. An absent file means a fresh start, so a restarting launcher can always pass it.

    Notes
    -----
    ``fit(X)``: X is the whole data set as every rank sees it (an array, ``np.memmap``,
    h5py dataset, ...); rank r reads only rows ``shard_range(n, r, world_size)``.
    ``fit_stream(chunks)``: ``chunks`` are this rank's own rows (its own file, say); the
    global row order is rank 0's rows, then rank 1's, and so on.

    Every rank must call ``fit`` with the same parameters. Progress bars show on rank 0 only.
    Inference (``predict``, ``score``, ...) is local to the calling rank.
    """

    def __init__(self, n_components=1, *, checkpoint=None, resume=False, **params):
        super().__init__(n_components, **params)
        self.checkpoint = checkpoint
        self.resume = resume

    # ------------------------------------------------------------------ entry points
    def fit(self, X, y=None):
        """Fit on this rank's row range of X (see the class notes); returns self."""
        self._check_parameters()
        if len(getattr(X, "shape", ())) != 2:
            raise ValueError(f"X must be a 2-D array-like with a shape (n_samples, n_features), got {type(X).__name__}")
        comm = _Comm()
        rows = shard_range(int(X.shape[0]), comm.rank, comm.world)
        return self._fit(ShardSource(X, self.chunk_size, comm, rows=rows))

    def fit_stream(self, chunks):
        """Fit on chunks of this rank's own rows (see the class notes); returns self."""
        self._check_parameters()
        return self._fit(ShardSource(chunks, self.chunk_size, _Comm()))

    def _fit(self, source):
        if self.checkpoint is not None and self.n_init != 1:
            raise ValueError(f"checkpointing resumes one EM run: use n_init=1 with checkpoint (got {self.n_init})")
        self._comm = source.comm
        verbose = self.verbose
        if self._comm.rank != 0:
            self.verbose = 0
        try:
            ckpt = self._read_checkpoint(source) if self.resume and self.checkpoint is not None else None
            if ckpt is None:
                self._progress = _Progress()
                return super()._fit(source)
            return self._resume_from(source, ckpt)
        finally:
            self.verbose = verbose

    # ------------------------------------------------------------------ EM pieces, made global
    def _initialize(self, source, rng, device):
        self._progress = _Progress()
        if self.means_init is not None:  # no sampling; the hard-assignment statistics are all-reduced
            return super()._initialize(source, rng, device)
        # As GaussianMixture._initialize, with the seeds chosen on rank 0 from the global sample.
        seeds = self._initial_seeds(source, rng)
        shift = torch.as_tensor(seeds.mean(0), device=device)
        stats = self._hard_assignment_stats(source, torch.as_tensor(seeds, device=device) - shift, shift, device)
        weights, means, cov = m_step(stats, self.covariance_type, self.reg_covar, self._relative_floor())
        if self.weights_init is not None:
            weights = torch.as_tensor(np.asarray(self.weights_init, dtype=np.float64), device=device)
        if self.precisions_init is not None:
            prec = torch.as_tensor(np.asarray(self.precisions_init, dtype=np.float64), device=device)
            cov = 1.0 / prec if self.covariance_type != "full" else torch.linalg.inv(prec)
        return self._recentre(EMState(weights, means, cov, None, shift))

    def _hard_assignment_stats(self, source, seeds_c, shift, device):
        return self._all_reduce_stats(super()._hard_assignment_stats(source, seeds_c, shift, device), 0.0)[0]

    def _e_step(self, source, state, device):
        stats, log_lik, worst = super()._e_step(source, state, device)
        stats, log_lik = self._all_reduce_stats(stats, log_lik)
        # nk is global now, so every rank takes this branch together (a collective inside).
        if bool((stats.nk < EMPTY_MASS).any()):
            worst = self._global_worst_rows(worst, state, device)
        self._progress.lower_bounds.append(float(log_lik) / source.n_total)
        return stats, log_lik, worst

    def _m_step(self, stats, worst_rows, state, n):
        state, reseeded = super()._m_step(stats, worst_rows, state, n)
        p = self._progress
        count = int(reseeded)
        p.n_iter, p.n_reseeded, p.last_reseeded = p.n_iter + 1, p.n_reseeded + count, bool(count)
        if self.checkpoint is not None and self._comm.rank == 0:
            save_checkpoint(self.checkpoint, self._to_checkpoint(state, n))
        return state, reseeded

    def _graphable(self, source, device) -> bool:
        # Every iteration all-reduces through the host.
        return False

    def _state(self, device):
        # A resumed run enters GaussianMixture._fit through its warm-start path; it must
        # continue from the checkpoint's exact state (same shift), not one rebuilt from
        # the public attributes.
        resumed = getattr(self, "_resumed", None)
        return resumed if resumed is not None else super()._state(device)

    # ------------------------------------------------------------------ helpers
    def _all_reduce_stats(self, stats, log_lik):
        """(stats, log_lik) summed over ranks in one all-reduce of a packed float64 buffer
        (``log_lik`` a number or a 0-d tensor; returned as a 0-d tensor)."""
        parts = (stats.nk, stats.s1, stats.s2)
        flat = torch.cat([t.reshape(-1) for t in parts]
                         + [torch.as_tensor(log_lik, dtype=torch.float64, device=stats.nk.device).reshape(1)])
        flat = self._comm.all_reduce(flat)
        out, start = [], 0
        for t in parts:
            out.append(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
        return type(stats)(stats.log_norm, *out), flat[-1]

    def _global_worst_rows(self, worst, state, device):
        """The RESEED_CANDIDATES worst-explained rows over all ranks, worst first, identical everywhere.

        ``worst`` (m, D), m <= RESEED_CANDIDATES, are this rank's; their exact log-likelihoods
        (a few rows, dense over all K whichever E-step the fit uses: the truncated one keys its
        state by row offset, which these rows no longer have) are gathered with them.
        """
        d = state.means.shape[1]
        log_norm = torch.logsumexp(self._weighted_log_prob(worst, self._kernel_params(state, device), state.shift),
                                   1) if worst.shape[0] else torch.empty(0, device=device)
        packed = torch.full((RESEED_CANDIDATES, d + 1), math.inf, dtype=torch.float64, device=device)
        packed[:worst.shape[0], 0] = log_norm.to(torch.float64)
        packed[:worst.shape[0], 1:] = worst
        rows = self._comm.all_gather(packed)
        rows = rows[torch.isfinite(rows[:, 0])]
        order = torch.argsort(rows[:, 0], stable=True)[:RESEED_CANDIDATES]
        return rows[order, 1:]

    def _initial_seeds(self, source, rng):
        """(K, D) float64 initial means, chosen on rank 0 from a global uniform sample, on every rank."""
        k, d = self.n_components, source.n_features
        if not hasattr(rng.bit_generator, "advance"):
            raise ValueError(f"distributed initialisation needs a random stream that can skip ahead "
                             f"(PCG64, the default, or Philox); got {type(rng.bit_generator).__name__}")
        # Rank 0's stream everywhere, so the keys of all rows form one stream, as in one process.
        rng.bit_generator.state = self._comm.broadcast_json(rng.bit_generator.state)
        size = min(sample_size(k, d), source.n_total)
        keys, rows = _local_sample(source, size, rng, source.offset)
        # uniform_sample draws one key per row: the stream ends where one process's would.
        rng.bit_generator.advance(source.n_total)
        sample = self._gather_sample(keys, rows, size)
        seeds = initial_means(sample, k, self.init_params, rng) if self._comm.rank == 0 else np.zeros((k, d))
        return self._comm.broadcast(torch.as_tensor(seeds, dtype=torch.float64)).numpy()

    def _gather_sample(self, keys, rows, size):
        """Rank 0: the ``size`` rows of smallest key over all ranks, ordered by key (as uniform_sample)."""
        below = int(np.searchsorted(keys, self._key_threshold(keys, size)))
        all_keys = self._comm.gather_rows(torch.from_numpy(keys[:below]))
        all_rows = self._comm.gather_rows(torch.from_numpy(rows[:below]))
        if self._comm.rank != 0:
            return None
        order = np.argsort(all_keys.numpy(), kind="stable")[:size]
        return all_rows.numpy()[order]

    def _key_threshold(self, keys, size):
        """A value t with ``size`` keys below it over all ranks, by bisection on all-reduced counts.

        Each rank holds its smallest keys, sorted (values in [0, 1)). The ranks move in
        lockstep (every decision is on a global count); only t, never the keys, is exchanged.
        If keys tie, t leaves a few more than ``size`` below it (rank 0 trims them).
        """
        count = lambda t: int(self._comm.all_reduce(torch.tensor([int(np.searchsorted(keys, t))]))[0])
        lo, hi = 0.0, 1.0
        if count(hi) == size:
            return hi
        while True:
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                return hi
            c = count(mid)
            if c == size:
                return mid
            lo, hi = (mid, hi) if c < size else (lo, mid)

    def _to_checkpoint(self, state, n):
        p = self._progress
        cpu = lambda t: t.detach().cpu().numpy()
        return Checkpoint(cpu(state.weights), cpu(state.means), cpu(state.cov), cpu(state.shift),
                          self.covariance_type, n, p.n_iter, list(p.lower_bounds), p.n_reseeded, p.last_reseeded)

    def _read_checkpoint(self, source):
        """The checkpoint (read on rank 0, broadcast), or None when there is none yet."""
        n = source.validate()
        header, arrays = None, None
        if self._comm.rank == 0:
            try:
                ckpt = load_checkpoint(self.checkpoint)
                header = ckpt.header()
                arrays = {name: getattr(ckpt, name) for name in Checkpoint._ARRAYS}
            except FileNotFoundError:
                header = {"absent": True}
            except ValueError as err:
                header = {"error": str(err)}
        header = self._comm.broadcast_json(header)
        if header.get("absent"):
            return None
        if "error" in header:
            raise ValueError(header["error"])
        arrays = {name: self._comm.broadcast(torch.as_tensor(arrays[name]) if arrays else
                                             torch.zeros(header["shapes"][name], dtype=torch.float64)).numpy()
                  for name in Checkpoint._ARRAYS}
        ckpt = Checkpoint(**arrays, **{key: header[key] for key in (
            "covariance_type", "n_samples", "n_iter", "lower_bounds", "n_reseeded", "last_reseeded")})
        expected = (n, self.covariance_type, (self.n_components, source.n_features))
        found = (ckpt.n_samples, ckpt.covariance_type, ckpt.means.shape)
        if found != expected:
            raise ValueError(f"{self.checkpoint}: checkpoint of (n_samples, covariance_type, means shape) = {found}, "
                             f"but this fit has {expected}; remove it or pass resume=False")
        return ckpt

    def _resume_from(self, source, ckpt):
        device = self._device()
        t = lambda a: torch.as_tensor(a, device=device)
        cov = t(ckpt.covariances)
        state = EMState(t(ckpt.weights), t(ckpt.means), cov, precisions_cholesky(cov, self.covariance_type),
                       t(ckpt.shift))
        self._progress = _Progress(ckpt.n_iter, list(ckpt.lower_bounds), ckpt.n_reseeded, ckpt.last_reseeded)
        self._set_state(state)
        self.n_features_in_ = source.n_features
        if ckpt.n_iter >= self.max_iter or ckpt.converged(self.tol):
            return self._finished_from(ckpt)
        # Continue through GaussianMixture._fit's warm-start path: it compares the first new
        # lower bound with lower_bound_, as the uninterrupted run compares consecutive ones.
        self.lower_bound_ = ckpt.lower_bounds[-1]
        saved = self.warm_start, self.max_iter
        self.warm_start, self.max_iter, self._resumed = True, self.max_iter - ckpt.n_iter, state
        try:
            super()._fit(source)
        finally:
            (self.warm_start, self.max_iter), self._resumed = saved, None
        self.n_iter_ += ckpt.n_iter
        self.lower_bounds_ = list(ckpt.lower_bounds) + list(self.lower_bounds_)
        self.n_reseeded_ += ckpt.n_reseeded
        return self

    def _finished_from(self, ckpt):
        """Attributes of a run whose last iteration the checkpoint already holds."""
        self.converged_ = ckpt.converged(self.tol)
        self.n_iter_, self.lower_bound_ = ckpt.n_iter, float(ckpt.lower_bounds[-1])
        self.lower_bounds_, self.n_reseeded_ = list(ckpt.lower_bounds), ckpt.n_reseeded
        if not self.converged_:
            warnings.warn(f"EM did not converge in max_iter={self.max_iter} iterations (checkpoint "
                          f"{self.checkpoint} holds the last one)", ConvergenceWarning)
        return self


# get_params, set_params and repr read the constructor's signature: it is GaussianMixture's
# parameters plus checkpoint and resume.
DistributedGaussianMixture.__init__.__signature__ = inspect.Signature(
    list(inspect.signature(GaussianMixture.__init__).parameters.values())
    + [inspect.Parameter("checkpoint", inspect.Parameter.KEYWORD_ONLY, default=None),
       inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False)])


def _local_sample(source, size, rng, offset):
    """This rank's part of ``uniform_sample``: its ``size`` smallest-key rows, keys ascending.

    Row ``offset + i`` gets the key that a single process drawing one key per row from
    ``rng`` would give it (the stream is skipped ahead, not drawn).

    Returns
    -------
    keys : ndarray of shape (m,), float64, ascending, m = min(size, local rows)
    rows : ndarray of shape (m, D), float32
    """
    bit_generator = copy.deepcopy(rng.bit_generator)
    bit_generator.advance(offset)
    local = np.random.Generator(bit_generator)
    keys = np.empty(0)
    rows = np.empty((0, source.n_features), dtype=np.float32)
    for _, block in source:
        block = np.asarray(block.cpu() if hasattr(block, "cpu") else block, dtype=np.float32)
        keys = np.concatenate([keys, local.random(block.shape[0])])
        rows = np.concatenate([rows, block])
        if keys.size > size:
            keep = np.argpartition(keys, size)[:size]
            keys, rows = keys[keep], rows[keep]
    order = np.argsort(keys, kind="stable")
    return keys[order], np.ascontiguousarray(rows[order])
