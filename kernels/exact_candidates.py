"""The exact-on-candidates E-step: a bfloat16 search, then float32 log Z and statistics.

A dense E-step must compute every (row, component) log-density accurately, because it cannot
know in advance which ones carry mass. Real posteriors are sparse (SIFT, K = 1024: about two
components per row within 40 nats of the best), so this E-step splits the work:

1. the search (``kernels.estep.candidate_search``): one bfloat16 product per tile pair gives
   every log-density with a proven error bound, and the row marks every component whose upper
   bound reaches its threshold, a proven lower bound of its best log-density less
   ``MARGIN_NATS``. A component left unmarked is more than ``MARGIN_NATS`` below the best, so all
   left out together carry at most K e^-30 ~ 1e-10 of the row's mass. The threshold is the
   exact log-density (``kernels.exact_log_prob``) of one component less the margin: within
   round-off of the best when the component is the best, as the row's best of an earlier E-step
   mostly is where the caller keeps them (``best``: EM's parameters move little between
   iterations); else the first of a bfloat16 ranking pass (``kernels.log_norm``, or library
   products for wide rows on a GPU). The pass is ``kernels.candidates`` for rows within one
   feature tile and ``kernels.candidates_wide`` over rows split once for wider ones.
2. ``kernels.candidate_resp``: the marks into per-row slots, then log Z and the responsibilities
   over them, in float32 from centred differences (x - mu); each row keeps, packed to the front
   of its slots, the (component, r) pairs of r >= e^-MARGIN_NATS.
3. ``kernels.kept_pairs`` gathers the kept (row, component, r) triples, and
   ``kernels.truncated_stats.pair_stats`` sums N_k, S1, S2 over them in float64, sorted by component.

Rows with more than ``capacity`` candidates (flat posteriors: early iterations, standardised
data) take the dense E-step, given as ``dense``.

Sizes. The kept pairs and the overflowed rows are counted on the GPU and read by the host, which
sizes the statistics' inputs from them. A CUDA graph cannot read them, so a captured E-step
(``static=True``) takes sizes fixed in advance from ``Hints`` (what earlier, host-sized E-steps
of the same rows met, with room to spare): kept pairs go to a buffer of ``Hints.pairs`` entries,
and up to ``Hints.rows`` overflowed rows are taken against every component
(``kernels.overflow_rows``). Where those sizes fall short, ``Hints.short`` says by how much: the statistics
are then incomplete, and the caller runs the E-step again host-sized.
"""
from __future__ import annotations

import math

import torch

from .candidate_resp import candidate_resp
from .candidates import n_words
from .kept_pairs import kept_pairs, kept_pairs_into
from .overflow_rows import overflow_pairs_into
from .params import NaturalParams
from .result import EStepResult
from .truncated_stats import pair_stats

MARGIN_NATS = 30.0
# Candidate slots per row, by covariance type; rows beyond take the dense path, whose few rows cost
# a dense E-step's launches. Replayed in float64 on 60,000 real SIFT rows, K = 1024, EM iterations
# 0-20 from bench_estep's start (eval/check_candidates.py, eval/results/check_candidates_*_sift_cpu.json):
# diag rows store 3.9-8.5 slots (p99 13-28, at most 44: none overflow 64);
# spherical posteriors are flatter (11-21 components within 30 nats), rows store 12-23 slots (p99
# 47-88, at most 177: 0-0.1% overflow 128).
CAPACITY = {"diag": 64, "spherical": 128}
# Bytes of one sub-block of rows: its marks (4 bytes per 32 components), slots and responsibilities
# (8 bytes a slot); 768 MB holds 1.2M diag or 700K spherical rows at K = 1024, and two sub-blocks
# exist at once (a static E-step holds one, of twice the bytes). Each sub-block's count of kept
# pairs is read on the host while the GPU works on the next one, yet fewer, larger sub-blocks cost
# less, up to 768 MB (H100, N = 1M, K = 1024, D = 128, ms per EM iteration at 384, 768 and 1536 MB:
# diag 8.01, 7.18, 7.14; spherical 5.56, 5.39, 6.21; eval/results/profile_candidates_h100.json).
SUB_BLOCK_BYTES = 3 << 28
# A captured E-step keeps room for the triples of this many (overflowed row, component) pairs at
# most (``kernels.overflow_rows``): the statistics pass sorts the whole room, used or not, with the
# kept pairs (~3.4M at N = 1M, SIFT-like rows): 128 rows at K = 1024.
OVERFLOW_PAIRS = 1 << 17


class Hints:
    """What the E-step of one block of rows carries from one call to the next.

    Parameters
    ----------
    best : int32 Tensor of shape (n,), each row's threshold component (module docstring),
        overwritten by every E-step with the rows' best (but for the rows that overflow in a
        host-sized one: those keep theirs)

    Attributes
    ----------
    best : as given
    pairs : int, kept (row, component) pairs a captured E-step has room for (0: none seen yet)
    rows : int, overflowed rows a captured E-step has room for
    short : int64 0-d Tensor, how many pairs and overflowed rows the last E-step found no room
        for (0 after a host-sized one)
    grouped : bool, whether the owner has put the rows in runs of equal ``best`` (the exact pass
        then walks the components a run of rows marks together, ``kernels.candidate_resp.walk``)
    """

    def __init__(self, best: torch.Tensor):
        self.best = best
        self.pairs = self.rows = 0
        self.grouped = False
        self.short = torch.zeros((), dtype=torch.int64, device=best.device)

    def grow(self, n_kept: int, n_over: int, max_rows: int) -> None:
        """Make room for what a host-sized E-step met: half as many pairs again (EM's posteriors
        change little from one iteration to the next, but from a k-means start the second
        iteration kept 31% more than the first: N = 1M, K = 1024, D = 128, spherical), twice the
        overflowed rows (at most ``max_rows``), and a little more of both."""
        self.pairs = max(self.pairs, -(-(n_kept + n_kept // 2 + 1) // 4096) * 4096)
        self.rows = max(self.rows, min(max_rows, 2 * n_over + 8))


def centred_params(params: NaturalParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means, precisions, consts) in float32 from natural parameters (worked out in float64):
    log pi_k + log N(x | k) = consts_k - 1/2 sum_d precisions_kd (x_d - means_kd)^2."""
    quad, lin, const = (t.double() for t in (params.quad, params.lin, params.const))
    prec = -2.0 * quad
    means = lin / (prec if params.diagonal else prec[:, None])
    consts = const + 0.5 * (lin * means).sum(1)
    return tuple(t.float().contiguous() for t in (means, prec, consts))


def _joined(parts):
    """One tensor of the sub-blocks' parts, not copied when there is one."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _sub_block_rows(capacity: int, n_comps: int, sub_blocks_held: int = 2) -> int:
    """Rows of one sub-block, where ``sub_blocks_held`` exist at once: their marks and candidate
    slots take ``2 * SUB_BLOCK_BYTES``."""
    return max(1, 2 * SUB_BLOCK_BYTES // (sub_blocks_held * (8 * capacity + 4 * n_words(n_comps))))


def overflow_room(n_comps: int) -> int:
    """How many overflowed rows a captured E-step keeps room for, at most: ``OVERFLOW_PAIRS`` of
    their triples."""
    return max(1, OVERFLOW_PAIRS // n_comps)


def estep(x, centred, shift, diagonal, search, dense, *, hints=None, capacity=None, margin=MARGIN_NATS,
          static=False):
    """Exact-on-candidates E-step of a block of rows.

    Parameters
    ----------
    x : Tensor of shape (n, D), n > 0, unit column stride, on the kernels' device
    centred : (means, precisions, consts), float32: ``centred_params`` of the mixture relative to
        ``shift``, its largest constant split off (``params.split_offset``), as
        ``kernels.candidate_weights`` gives them
    shift : float32 Tensor of shape (D,)
    diagonal : bool, whether the mixture is diagonal (else spherical)
    search : callable (rows, centred, margin, hint) -> marks, the candidate search
        (``kernels.estep.candidate_search``) of a block of rows, ``hint`` the rows' slice of
        ``best`` or None
    dense : callable (rows) -> EStepResult (log_norm float64 without the offset), the dense
        E-step of the rows that overflow their capacity
    hints : Hints or None: each row's threshold component, from an earlier E-step (``hints.best``,
        overwritten with this E-step's best), and the sizes of a static E-step (grown by a
        host-sized one)
    capacity : int, candidate slots per row, or None for ``CAPACITY``
    margin : float, nats
    static : bool, sizes from ``hints`` (which must have seen a host-sized E-step) and no host
        read, so that a CUDA graph can capture it (module docstring)

    Returns
    -------
    EStepResult, float64 (log_norm without the offset), and the number of overflowed rows: an int,
    or, static, a 0-d int64 Tensor
    """
    capacity = capacity or CAPACITY["diag" if diagonal else "spherical"]
    if static:
        return _static_estep(x, centred, shift, diagonal, search, hints, capacity, margin)
    best = None if hints is None else hints.best
    log_norm = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    rows, comps, resp, over = [], [], [], []

    def collect(start, r, cand, kept, ends, overflowed, sizes, ready):
        """The kept (row, component, r) triples and the overflowed rows of a sub-block."""
        if ready is not None:
            ready.synchronize()
        n_kept, n_over = sizes.tolist()
        # Sized on the host: no synchronisation (the queued sub-block would be waited for).
        for parts, part in zip((rows, comps, resp), kept_pairs(cand, r, kept, ends, n_kept, first_row=start)):
            parts.append(part)
        if n_over:
            over.append(torch.nonzero_static(overflowed, size=n_over).view(-1) + start)

    pending = None
    sub_block = _sub_block_rows(capacity, len(centred[2]))
    for start in range(0, x.shape[0], sub_block):
        part = x[start:start + sub_block]
        hint = None if best is None else best[start:start + len(part)]
        marks = search(part, centred, margin, hint)
        # Rows that overflow keep their hint: the dense E-step finds no best.
        lz, r, _, cand, count, kept = candidate_resp(part, shift, *centred, marks, capacity,
                                                     min_resp=math.exp(-margin), best=hint,
                                                     grouped=hints is not None and hints.grouped)
        log_norm[start:start + len(part)] = lz
        overflowed, ends = count > capacity, torch.cumsum(kept, 0)
        sizes = torch.stack([ends[-1], overflowed.sum()]).to("cpu", non_blocking=True)
        ready = torch.cuda.Event() if x.device.type == "cuda" else None
        if ready is not None:
            ready.record()
        if pending is not None:
            collect(*pending)
        pending = (start, r, cand, kept, ends, overflowed, sizes, ready)
    collect(*pending)
    if hints is not None:
        hints.grow(sum(len(part) for part in rows), sum(len(part) for part in over),
                   overflow_room(len(centred[2])))
        hints.short.zero_()
    nk, s1, s2 = pair_stats(x, shift, _joined(rows), _joined(comps), _joined(resp), len(centred[2]), diagonal)
    if not over:
        return EStepResult(log_norm, nk, s1, s2), 0
    over = _joined(over)
    rest = dense(x[over])
    log_norm[over] = rest.log_norm
    return EStepResult(log_norm, nk + rest.nk, s1 + rest.s1, s2 + rest.s2), over.numel()


def _static_estep(x, centred, shift, diagonal, search, hints, capacity, margin):
    """``estep(static=True)``: no host read, sizes from ``hints``."""
    if hints is None or not hints.pairs:
        raise ValueError("a static E-step takes its sizes from hints that have seen a host-sized E-step")
    n, n_comps = x.shape[0], len(centred[2])
    device = x.device
    log_norm = torch.empty(n, dtype=torch.float64, device=device)
    overflowed = torch.empty(n, dtype=torch.bool, device=device)
    # The kept pairs, then room for the overflowed rows' triples, "no pair" where nothing is written.
    room = hints.pairs + hints.rows * n_comps
    triples = (torch.zeros(room, dtype=torch.int32, device=device),
               torch.full((room,), n_comps, dtype=torch.int32, device=device),
               torch.zeros(room, dtype=torch.float32, device=device))
    n_kept = torch.zeros((), dtype=torch.int64, device=device)
    # One sub-block exists at a time (none waits for a host read), so each may take the bytes of
    # the two a host-sized E-step holds: N = 1M spherical rows at K = 1024 then take one launch of
    # each pass, not two.
    sub_block = _sub_block_rows(capacity, n_comps, sub_blocks_held=1)
    for start in range(0, n, sub_block):
        part = x[start:start + sub_block]
        end = start + len(part)
        marks = search(part, centred, margin, hints.best[start:end])
        lz, r, _, cand, count, kept = candidate_resp(part, shift, *centred, marks, capacity,
                                                     min_resp=math.exp(-margin), best=hints.best[start:end],
                                                     grouped=hints.grouped)
        over = count > capacity
        overflowed[start:end] = over
        # Overflowed rows' log Z is written by ``overflow_pairs_into`` where there is room for them.
        log_norm[start:end] = torch.where(over, 0.0, lz.double())
        ends = torch.cumsum(kept, 0) + n_kept
        kept_pairs_into(tuple(t[:hints.pairs] for t in triples), cand, r, kept, ends, first_row=start)
        n_kept = ends[-1]
    over = torch.nonzero_static(overflowed, size=hints.rows, fill_value=-1).view(-1)
    overflow_pairs_into(tuple(t[hints.pairs:] for t in triples), x, over, centred, shift, math.exp(-margin),
                        log_norm, hints.best)
    n_over = overflowed.sum()
    hints.short.copy_((n_kept - hints.pairs).clamp_min(0) + (n_over - hints.rows).clamp_min(0))
    nk, s1, s2 = pair_stats(x, shift, *triples, n_comps, diagonal)
    return EStepResult(log_norm, nk, s1, s2), n_over
