"""Exact pass of the exact-on-candidates E-step: log Z and responsibilities over each row's candidates.

One program owns BLOCK_N rows. It counts each row's marks (``kernels.candidates``: one bit per
component, 32 to a word), then walks them in component order, one candidate per row and step,
up to the block's largest count. A row's words stay in registers, WORDS at a time (all of them
up to K = 32 WORDS = 1024): each step takes the lowest mark of a row's first non-zero word, and a
row whose words are spent loads its next WORDS. For every candidate the log-density is computed
in float32 from centred differences (``kernels.exact_log_prob``), so raw-scale rows (SIFT:
0..255) lose nothing to cancellation, stored in the row's next slot and folded into an online
log-sum-exp; the largest gives the row's best component (the next E-step's hint,
``exact_candidates``). A second walk turns the stored log-densities into responsibilities and
keeps, packed to the front of the row's slots, those of at least ``min_resp``: the statistics
then read only the kept (row, component, r) triples, never all the row's slots. Rows with more
candidates than slots keep none (their E-step is the dense one; their log Z is left unwritten).

Oracle: the float64 dense E-step of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .exact_log_prob import exact_log_prob, feature_tile, row_tile

# Words of marks a row holds in registers (K = 1024: all of them).
WORDS = 32
# Rows up to this wide stay in registers across their candidates (4 rows, one warp); wider ones
# are re-read per candidate. H100, N = 100K, K = 1024, ~3 candidates a row: D = 960 diag 0.46 ms
# held against 0.79 re-read, spherical 0.35 against 0.72; D = 256 diag 0.25 against 0.30.
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
def _words(marks, start, row_mask, n_words, WORDS: tl.constexpr):
    """(BLOCK_N, WORDS) uint32: each row's marks from its word ``start`` on (0 past the last)."""
    word = start[:, None] + tl.arange(0, WORDS)[None, :]
    return tl.load(marks[:, None] + word, mask=row_mask[:, None] & (word < n_words), other=0).to(tl.uint32,
                                                                                                bitcast=True)


@triton.jit
def _first_word(words, WORDS: tl.constexpr):
    """Column of each row's first non-zero word, WORDS where all are zero."""
    return tl.min(tl.where(words != 0, tl.arange(0, WORDS)[None, :], WORDS), axis=1)


@triton.jit
def candidate_resp_kernel(x_ptr, stride_x, shift_ptr, mean_ptr, prec_ptr, const_ptr, mark_ptr, n_words,
                          cand_ptr, count_ptr, kept_ptr, log_norm_ptr, resp_ptr, best_ptr, min_resp, n_rows,
                          n_cols, CAPACITY: tl.constexpr, DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr, WORDS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    marks = mark_ptr + rows.to(tl.int64) * n_words
    start = tl.zeros([BLOCK_N], dtype=tl.int32)  # first word of each row's ``words``
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for w0 in range(0, n_words, WORDS):
        count += tl.sum(_popcount(_words(marks, start + w0, row_mask, n_words, WORDS)), axis=1)
    tl.store(count_ptr + rows, count, mask=row_mask)
    todo = tl.where(count <= CAPACITY, count, 0)  # overflowed rows: the dense E-step's
    # Rows of one feature tile stay in registers for every candidate; wider rows are re-read per candidate.
    x_tile = row_tile(x_ptr, stride_x, shift_ptr, rows, row_mask, n_cols, BLOCK_N, BLOCK_D, ONE_TILE)
    slots = rows.to(tl.int64) * CAPACITY
    run_max = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.zeros([BLOCK_N], dtype=tl.int64)
    words = _words(marks, start, todo > 0, n_words, WORDS)  # the marks not yet taken
    for s in range(tl.max(todo)):
        live = s < todo
        first = _first_word(words, WORDS)
        # A live row has a mark left in its words or in later ones.
        advance = live & (first == WORDS)
        while tl.max(advance.to(tl.int32)) > 0:
            start = tl.where(advance, start + WORDS, start)
            words = tl.where(advance[:, None], _words(marks, start, advance, n_words, WORDS), words)
            first = _first_word(words, WORDS)
            advance = live & (first == WORDS)
        at = (tl.arange(0, WORDS)[None, :] == first[:, None]) & live[:, None]
        bit, low = _lowest_bit(tl.max(tl.where(at, words, 0), axis=1))
        words = tl.where(at, words ^ low[:, None], words)
        comp = ((start + first) * 32 + bit).to(tl.int64)
        ll = exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, live, comp,
                            n_cols, DIAGONAL, ONE_TILE, BLOCK_D)
        tl.store(cand_ptr + slots + s, comp.to(tl.int32), mask=live)
        tl.store(resp_ptr + slots + s, ll, mask=live)
        best = tl.where(ll > run_max, comp, best)
        new_max = tl.maximum(run_max, ll)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(ll - new_max)
        run_max = new_max
    log_z = run_max + tl.log(tl.where(todo > 0, run_sum, 1.0))  # rows with no candidate: log Z unused
    tl.store(log_norm_ptr + rows, log_z, mask=row_mask & (todo > 0))
    tl.store(best_ptr + rows, best.to(tl.int32), mask=row_mask & (todo > 0))
    # Packing in place is safe: a row's kept slot never lies past the slot being read.
    kept = tl.zeros([BLOCK_N], dtype=tl.int32)
    for s in range(tl.max(todo)):
        r = tl.exp(tl.load(resp_ptr + slots + s, mask=s < todo, other=float("-inf")) - log_z)
        keep = (s < todo) & (r >= min_resp)
        comp = tl.load(cand_ptr + slots + s, mask=keep)
        tl.store(resp_ptr + slots + kept, r, mask=keep)
        tl.store(cand_ptr + slots + kept, comp, mask=keep)
        kept += keep.to(tl.int32)
    tl.store(kept_ptr + rows, kept, mask=row_mask)


def candidate_resp(x, shift, means, precisions, consts, marks, capacity, *, min_resp=0.0, best=None, block_n=None,
                   num_warps=1):
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
    block_n : rows a program, or None: 2 (diag), 4 (spherical)

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
    # A block walks as many candidates as its longest row holds: few rows a block waste few steps.
    # Timed on an H100 (bench_estep's D = 128 cell, rows in registers): 4 rows with 1 warp took
    # 1.2-3.8x less time than 4-32 rows with 2-4 warps, diag and spherical; then on bench_fit's rows
    # after 5 EM iterations (N = 1M, K = 1024, ~3.9 candidates a row), 1 warp, two runs: diag 2 rows
    # 1.07 ms against 4 rows 1.20-1.21; spherical 4 rows 0.21-0.23 against 2 rows 0.26, 8 rows 0.25-0.26.
    block_n = block_n or (2 if diagonal else 4)
    block_d, one_tile = feature_tile(d, ONE_TILE_FEATURES)
    candidate_resp_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), shift, means, precisions, consts, marks, marks.shape[1], cand, count, kept, log_norm, resp,
        best, min_resp, n, d, CAPACITY=capacity, DIAGONAL=diagonal, BLOCK_N=block_n, BLOCK_D=block_d,
        ONE_TILE=one_tile, WORDS=min(WORDS, triton.next_power_of_2(marks.shape[1])), num_warps=num_warps)
    return log_norm, resp, best, cand, count, kept
