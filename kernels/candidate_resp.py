"""Exact pass of the exact-on-candidates E-step: log Z and responsibilities over each row's candidates.

One program owns BLOCK_N rows. It counts each row's marks (``kernels.candidates``: one bit per
component, 32 to a word), then walks them in component order, WORDS words at a time (all of them
up to K = 32 WORDS = 1024), in one of two ways (``walk``):

- gathered: each step takes every row's own lowest mark left, and loads each row's component;
- shared: each step takes the lowest of those, loads it once and evaluates it for the rows that
  marked it. Where neighbouring rows mark the same components (the fit's own copy of the rows,
  grouped by best component: four such diag rows mark 4.0 components between them, four rows in
  their given order 15.7) a block reads each component once instead of once per row.

For every candidate the log-density is computed in float32 from centred differences
(``kernels.exact_log_prob``), so raw-scale rows (SIFT: 0..255) lose nothing to cancellation,
stored in the row's next slot and folded into an online log-sum-exp; the largest gives the row's
best component (the next E-step's hint, ``exact_candidates``). A second walk turns the stored
log-densities into responsibilities and keeps, packed to the front of the row's slots, those of
at least ``min_resp``: the statistics then read only the kept (row, component, r) triples, never
all the row's slots. Rows with more candidates than slots keep none (their E-step is the dense
one; their log Z is left unwritten).

Oracle: the float64 dense E-step of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .exact_log_prob import exact_log_prob, feature_tile, row_tile

# Words of marks a row holds in registers (K = 1024: all of them).
WORDS = 32
# Rows up to this wide stay in registers across their candidates; wider ones are re-read per
# candidate (gathered walk, 4 rows, one warp). H100, N = 100K, K = 1024, ~3 candidates a row:
# D = 960 diag 0.46 ms held against 0.79 re-read, spherical 0.35 against 0.72; D = 256 diag 0.25
# against 0.30.
ONE_TILE_FEATURES = 1024


@triton.jit
def _popcount(w):
    """Set bits of each uint32 value (the SWAR count: pairs, nibbles, then bytes summed by a multiply)."""
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    return ((w * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _lowest_bit(w):
    """(index, value) of each non-zero uint32's lowest set bit: a power of two converts to float32
    exactly, and its exponent field is the index."""
    low = w & (~w + 1)
    return (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127, low


@triton.jit
def _words(marks, w0, row_mask, n_words, WORDS: tl.constexpr):
    """(BLOCK_N, WORDS) uint32: each row's marks from word ``w0`` on (0 past the last)."""
    word = w0 + tl.arange(0, WORDS)
    return tl.load(marks[:, None] + word[None, :], mask=row_mask[:, None] & (word < n_words)[None, :],
                   other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _first_word(words, WORDS: tl.constexpr):
    """Column of each row's first non-zero word, WORDS where all are zero."""
    return tl.min(tl.where(words != 0, tl.arange(0, WORDS)[None, :], WORDS), axis=1)


@triton.jit
def _take(ll, comp, live, taken, run_max, run_sum, best, cand_ptr, resp_ptr, slots):
    """Store each live row's log-density ``ll`` of ``comp`` in its next slot and fold it into the
    row's online log-sum-exp and best component. Other rows see ll = -inf: nothing changes for them."""
    tl.store(cand_ptr + slots + taken, comp.to(tl.int32), mask=live)
    tl.store(resp_ptr + slots + taken, ll, mask=live)
    best = tl.where(ll > run_max, comp, best)
    new_max = tl.maximum(run_max, ll)
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(ll - new_max)
    return taken + live.to(tl.int32), new_max, run_sum, best


@triton.jit
def candidate_resp_kernel(x_ptr, stride_x, shift_ptr, mean_ptr, prec_ptr, const_ptr, mark_ptr, n_words,
                          cand_ptr, count_ptr, kept_ptr, log_norm_ptr, resp_ptr, best_ptr, min_resp, n_rows,
                          n_cols, CAPACITY: tl.constexpr, DIAGONAL: tl.constexpr, SHARED: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
                          WORDS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    marks = mark_ptr + rows.to(tl.int64) * n_words
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for w0 in range(0, n_words, WORDS):
        count += tl.sum(_popcount(_words(marks, w0, row_mask, n_words, WORDS)), axis=1)
    tl.store(count_ptr + rows, count, mask=row_mask)
    walk = row_mask & (count <= CAPACITY)  # overflowed rows: the dense E-step's
    # Rows of one feature tile stay in registers for every candidate; wider rows are re-read per candidate.
    x_tile = row_tile(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_N, BLOCK_D, ONE_TILE)
    slots = rows.to(tl.int64) * CAPACITY
    run_max = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.zeros([BLOCK_N], dtype=tl.int64)
    taken = tl.zeros([BLOCK_N], dtype=tl.int32)
    for w0 in range(0, n_words, WORDS):
        words = _words(marks, w0, walk, n_words, WORDS)  # the marks not yet taken
        left = tl.sum(_popcount(words), axis=1)
        while tl.max(left) > 0:
            # Each row's lowest mark left.
            first = _first_word(words, WORDS)
            at = tl.arange(0, WORDS)[None, :] == first[:, None]
            bit, low = _lowest_bit(tl.max(tl.where(at, words, 0), axis=1))
            own = (w0 + first) * 32 + bit
            if SHARED:
                # The lowest of them, loaded once for the rows that marked it.
                comp = tl.min(tl.where(left > 0, own, 2**31 - 1)).to(tl.int64)
                live = (left > 0) & (own == comp)
            else:
                comp = own.to(tl.int64)
                live = left > 0
            ll = exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, live, comp,
                                n_cols, DIAGONAL, ONE_TILE, BLOCK_D, SHARED=SHARED)
            words = tl.where(at & live[:, None], words ^ low[:, None], words)
            left -= live.to(tl.int32)
            taken, run_max, run_sum, best = _take(ll, comp, live, taken, run_max, run_sum, best, cand_ptr,
                                                  resp_ptr, slots)
    log_z = run_max + tl.log(tl.where(taken > 0, run_sum, 1.0))  # rows with no candidate: log Z unused
    tl.store(log_norm_ptr + rows, log_z, mask=taken > 0)
    tl.store(best_ptr + rows, best.to(tl.int32), mask=taken > 0)
    # Packing in place is safe: a row's kept slot never lies past the slot being read.
    kept = tl.zeros([BLOCK_N], dtype=tl.int32)
    for s in range(tl.max(taken)):
        r = tl.exp(tl.load(resp_ptr + slots + s, mask=s < taken, other=float("-inf")) - log_z)
        keep = (s < taken) & (r >= min_resp)
        comp = tl.load(cand_ptr + slots + s, mask=keep)
        tl.store(resp_ptr + slots + kept, r, mask=keep)
        tl.store(cand_ptr + slots + kept, comp, mask=keep)
        kept += keep.to(tl.int32)
    tl.store(kept_ptr + rows, kept, mask=row_mask)


def walk(diagonal: bool, n_features: int, grouped: bool, device: torch.device) -> tuple[bool, int]:
    """(shared, rows a program) of the exact pass (module docstring).

    H100, K = 1024, ~3.9 candidates a row, the calls of a fit's last host-sized E-step (ms,
    grouped / shuffled rows; eval/results/exact_pass_walks_h100.json): D = 128 diag, shared 4
    rows 0.65 / 1.76, shared 1 row 1.07 / 0.99, gathered 2 rows 1.00 / 1.17; D = 128 spherical,
    shared 4 rows 0.80 / 2.15 (4 grouped rows mark 6.7 components between them, diag 4.0),
    gathered 4 rows 0.78 / 0.92; D = 960 (N = 100K), shared 1 row diag 0.45 / 0.46, spherical
    0.26 / 0.25, shared 4 grouped rows diag 0.27, gathered 4 rows 0.55 / 0.52 and 0.34 / 0.37.
    Under Triton's interpreter (CPU tensors: the tests) programs run one after another in
    Python: few large ones.
    """
    if device.type == "cpu":
        return False, 16
    if not diagonal and n_features <= 128:
        return False, 4
    return True, 4 if diagonal and grouped else 1


def candidate_resp(x, shift, means, precisions, consts, marks, capacity, *, min_resp=0.0, best=None,
                   grouped=False):
    """Launch the exact pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    means : float32 Tensor of shape (K, D), relative to the shift
    precisions : float32 Tensor of shape (K, D) (diag) or (K,) (spherical), 1 / variance
    consts : float32 Tensor of shape (K,), log pi_k - 1/2 log det(2 pi Sigma_k) (less the E-step's offset)
    marks : int32 Tensor of shape (n, ceil(K / 32)), from ``kernels.candidates.candidates``
    capacity : int, candidate slots per row
    min_resp : float, the least responsibility a kept candidate has (0: keep every candidate)
    best : int32 Tensor of shape (n,) or None, written in place as the returned ``best`` (rows
        that overflow keep their value)
    grouped : bool, whether the rows come in runs of equal best component (the fit's own device
        copy, ``GaussianMixture._group_rows``): neighbouring rows then mark the same components

    Returns
    -------
    log_norm : float32 Tensor of shape (n,), written where 0 < count <= capacity
    resp : float32 Tensor of shape (n, capacity), the kept candidates' responsibilities in the
        row's first ``kept`` slots (the rest unwritten)
    best : int32 Tensor of shape (n,), the component of largest log-density, written where
        0 < count <= capacity
    cand : int32 Tensor of shape (n, capacity), the kept candidates in component order in the
        row's first ``kept`` slots
    count : int32 Tensor of shape (n,), candidates marked (> capacity: the row overflowed)
    kept : int32 Tensor of shape (n,), candidates kept (0 where the row overflowed)
    """
    n, d = x.shape
    log_norm = torch.empty(n, dtype=torch.float32, device=x.device)
    resp = torch.empty(n, capacity, dtype=torch.float32, device=x.device)
    best = torch.empty(n, dtype=torch.int32, device=x.device) if best is None else best
    cand = torch.empty(n, capacity, dtype=torch.int32, device=x.device)
    count = torch.empty(n, dtype=torch.int32, device=x.device)
    kept = torch.empty(n, dtype=torch.int32, device=x.device)
    diagonal = precisions.dim() == 2
    shared, block_n = walk(diagonal, d, grouped, x.device)
    block_d, one_tile = feature_tile(d, ONE_TILE_FEATURES)
    # One warp a program: the walk's reductions stay within it (4 warps: 1.7-3x slower).
    candidate_resp_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), shift, means, precisions, consts, marks, marks.shape[1], cand, count, kept, log_norm, resp,
        best, min_resp, n, d, CAPACITY=capacity, DIAGONAL=diagonal, SHARED=shared, BLOCK_N=block_n,
        BLOCK_D=block_d, ONE_TILE=one_tile, WORDS=min(WORDS, triton.next_power_of_2(marks.shape[1])), num_warps=1)
    return log_norm, resp, best, cand, count, kept
