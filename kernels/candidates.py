"""Candidate pass of the exact-on-candidates E-step: every component that can matter to a row.

One program owns BLOCK_N rows, loaded and split once (a row fits one feature tile: D <= BLOCK_D;
wider rows take ``kernels.candidates_wide``), and streams over all K components in (BLOCK_N, BLOCK_K)
tiles. Each tile yields, for every (row, component), a proven upper bound U_nk of the exact
log-density l_nk = const_k + lin_k . x_n + quad_k . x_n^2 (quad = -1/2 the precisions) from one
float32 accumulator of bfloat16 products (diag: and one addition): the rounding error's bound is
folded into the weights (``search_weights``), so the pass costs what the products cost.

Diag. Rounding to bfloat16 (u = 2^-8, with room for rounding float64 through float32) gives
x~ = bf16(x), xx~ = bf16(x^2), lin~ = bf16(lin) and q~ = bf16(c quad) for a factor c < 1, and

    U_nk = P_nk + b_k,    P_nk = lin~_k . x~_n + q~_k . xx~_n (float32 sums),
                          b_k = const_k + eps C_k (rounded up),  C_k = sum_d lin~_kd^2 / (4 |quad_kd|).

Proof: with Q = |quad_k| . x_n^2 and a = (2u + u^2) / (1 - u)^2, |lin~ x~ - lin x| <= a |lin~| |x~|
featurewise, and |a b| <= t a^2 + b^2 / (4 t) with t = |quad_kd| bounds |lin~|.|x~| by
(1 + u)^2 Q + C_k; q~ . xx~ is within (2u + u^2) c Q of -c Q; the float32 sums of 2 D products add
at most g = gamma_2D (with 2^-23 per addition: any order, any rounding) of those sizes. So
l - const <= P + (a + g) C_k + Q [(a + g)(1 + u)^2 + c (1 + 2u + u^2)(1 + g) - 1], and the bracket is
<= 0 for c = (1 - (a + g)(1 + u)^2) / ((1 + 2u + u^2)(1 + g)) (``fold_factors``): the quad weights
give up 4u of their size to pay for the rounding of both products, and eps = a + g. What U
adds over l~ is about 4u Q + 2u C_k: the elementwise error bound's size, which on fitted SIFT
models is 5.9-57.5 nats at a row's best component (float64 replay across EM,
``eval/results/check_candidates_diag_sift_cpu.json``), where a norm (Cauchy-Schwarz) bound is
tens of nats looser (variances differ by orders of magnitude between features).

Spherical. One product, P = lin~ . x~, and the rest of the bound as sixteen more columns of it
(one bfloat16 product step), so a tile's bound is its product and nothing after it:

    U_nk = P_nk + (s1 + s2)(q1 + q2) + (b1 + b2) + r~ w~    (one float32 accumulator)

row side [s1, s1, s2, s2, 1, 1, r~, 0 ...], component side [q1, q2, q1, q2, b1, b2, w~, 0 ...]
(``bound_rows``, ``SearchWeights.columns``): s1 = bf16(s) and s2 = bf16(s - s1) rounded down, s the
float32 |x|^2 (s - s1 is exact, so s1 + s2 <= s); q1 = bf16(q') and q2 = bf16(q' - q1) rounded
up, q' = c quad in float32 (so q1 + q2 >= q'); b1 + b2 >= b likewise; r~ and w~ rounded up from
||x~|| and eps' ||lin~||. Every product of bfloat16 values is exact in float32, and with s >= 0 and
q' <= 0, (s1 + s2)(q1 + q2) >= q' s. The accumulator sums D + 16 products, within
g = gamma_{D+16} of their sizes: ||lin~|| ||x~|| (Cauchy-Schwarz), (1 + 2^-5) |q' s|, (1 + 2^-6) |b|
and the last term's own. So the three parts pay for it separately: the norm term
eps' ||x~|| ||lin~|| with eps' = (a + g) / (1 - g) (and the norm's float32 rounding) covers
|lin~ . x~ - lin . x| <= a ||lin~|| ||x~|| and the products' share; c = 1 / ((1 + g')(1 + g (1 + 2^-5)))
makes q' s (1 + g (1 + 2^-5)) >= quad |x|^2, the float32 |x|^2 being within g' = gamma_D of the exact
one; and b = const + g_b |const| rounded up, g_b = g (1 + 2^-6) / (1 - g (1 + 2^-6)), covers the
constant's share (``fold_factors``). Compiled for sm_90 at (128, 128) tiles with 4 warps, the
epilogue this replaces (two rank-one fused multiply-adds and the constant's addition) was 384 of a
step's 1,021 instructions per thread; the extra columns add one product step to the eight of D = 128.
A spherical model's linear weights are its means times one precision: the norm
bound stays within a few nats (float64 replay on real SIFT rows across EM, K = 1024: 1.3-4.0 nats at
the row's best component, ``eval/results/check_candidates_spherical_sift_cpu.json``).

Diag: rounding is monotonic, so the last addition needs no slack: if l_nk reaches a float32 floor,
so does the float32 U_nk. b_k is rounded up from float64, -inf for components of weight 0 (spherical:
b1 = -inf, b2 = 0).

Each row comes with a floor (``exact_candidates``: the exact log-density of one component, less
the margin), and a component is marked when U_nk reaches it: nothing whose exact log-density is
within the margin of the row's best is ever left out. The marks are one bit per (row, component),
packed 32 components to an int32 word, (n, ceil(K / 32)) words: a tile's marks are one sum per 32
of its columns and one store per word, where writing the candidates into per-row slots took a
prefix sum and a scattered store per tile (H100, N = 1M, K = 1024, D = 128, diag: 4.7 against
2.4 ms). The exact pass (``kernels.candidate_resp``) turns the marks into slots.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .exact_log_prob import exact_log_prob
from .tile import round_bf16, round_bf16_directed, split, split_dtype
from .truncated_select import load_rows

# bfloat16 unit round-off, with room for rounding float64 through float32 on the way.
_U = 2.0 ** -8 + 2.0 ** -22
# The spherical bound's columns: one bfloat16 product step (the kernels spell it out as 16).
BOUND_COLUMNS = 16


def _gamma(n_terms: int) -> float:
    """Higham's gamma_n for sums of n terms at 2^-23 per addition (round to nearest or not)."""
    t = n_terms * 2.0 ** -23
    return t / (1 - t)


def fold_factors(n_features: int, diagonal: bool) -> tuple[float, float, float]:
    """(c, eps, g_b) of the module docstring: diag, the quad weights' factor c and C_k's factor eps
    (g_b = 0: b_k is added after the sums); spherical, the quad factor c, eps' (the factor of
    ||x~|| ||lin~||) and the constant's factor g_b. Each with room for its rounding to float32
    (Triton passes Python floats as float32 scalars)."""
    a = (2 * _U + _U * _U) / (1 - _U) ** 2
    if diagonal:
        g = _gamma(2 * n_features)
        c, eps, slack = (1 - (a + g) * (1 + _U) ** 2) / ((1 + _U) ** 2 * (1 + g)), a + g, 0.0
    else:
        g, g_sq = _gamma(n_features + BOUND_COLUMNS), _gamma(n_features)
        c = 1 / ((1 + g_sq) * (1 + g * (1 + 2.0 ** -5)))
        # The float32 norm of x~ may fall short by the rounding of D squares, their sum and the
        # square root.
        eps = (a + g) / ((1 - g) * (1 - (n_features + 8) * 2.0 ** -24))
        slack = g * (1 + 2.0 ** -6) / (1 - g * (1 + 2.0 ** -6))
    return c * (1 - 2.0 ** -22), eps * (1 + 2.0 ** -22), slack * (1 + 2.0 ** -22)


class SearchWeights(NamedTuple):
    """The candidate pass's operands (module docstring); bfloat16 values, float32 under the
    interpreter, unless said otherwise.

    Attributes
    ----------
    lin : (K, D) Tensor, lin~
    quad : (K, D) Tensor of q~ = bf16(c quad) (diag), None (spherical)
    bias : (K,) float32 Tensor, b_k rounded up, -inf for components of weight 0 (diag), None
    lin_quad : (K, 2 D) Tensor [lin~ | q~] (diag), None: the fused pass's one operand
    columns : (K, 16) Tensor, the component side of the bound's columns
        [q1, q2, q1, q2, b1, b2, w~, 0 ...] (spherical), None
    """

    lin: torch.Tensor
    quad: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lin_quad: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    @property
    def diagonal(self) -> bool:
        return self.columns is None

    @property
    def n_comps(self) -> int:
        return self.lin.shape[0]


def _rounded_up(t: torch.Tensor) -> torch.Tensor:
    """float32 values >= the float64 ones (infinities kept)."""
    return torch.where(torch.isfinite(t), t + 2.0 ** -23 * t.abs(), t).float()


def bf16_values(t: torch.Tensor, direction: int = 0) -> torch.Tensor:
    """bfloat16 values of a float32 tensor, kept in float32, by bits as ``tile.round_bf16`` (0:
    nearest, ties away from zero) and ``tile.round_bf16_directed`` (1: up, -1: down)."""
    bits = t.float().view(torch.int32)
    if direction == 0:
        bits = bits + 0x8000
    else:
        away = bits > 0 if direction > 0 else bits < 0
        bits = torch.where(away, bits + 0xFFFF, bits)
    return (bits & -65536).view(torch.float32)


def bound_columns(quad, const, norm, c, eps, slack):
    """(K, 16) float32: ``SearchWeights.columns`` (bfloat16 values) of a spherical model's float64
    ``quad`` and ``const`` (K,) and its ||lin~|| (K,) rounded up to float32."""
    q = (c * quad).float()
    q1 = bf16_values(q)
    bias = _rounded_up(torch.where(torch.isfinite(const), const + slack * const.abs(), const))
    b1 = bf16_values(bias)
    b2 = torch.where(torch.isfinite(bias), bf16_values(bias - b1, 1), 0.0)
    q2, w = bf16_values(q - q1, 1), bf16_values(_rounded_up(eps * norm.double()), 1)
    columns = torch.zeros(len(q), BOUND_COLUMNS, dtype=torch.float32, device=q.device)
    columns[:, :7] = torch.stack([q1, q2, q1, q2, b1, b2, w], 1)
    return columns


def bound_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """(n, 16) float32: ``bound_rows`` of centred rows ``x`` (n, D) by torch: the row side of the
    spherical bound's columns (bfloat16 values), from the float32 |x|^2 and ||x~||."""
    x = x.float()
    xb = bf16_values(x)
    sq, norm = (x * x).sum(1), (xb * xb).sum(1).sqrt()
    s1 = bf16_values(sq)
    s2, one = bf16_values(sq - s1, -1), torch.ones_like(sq)
    terms = [s1, s1, s2, s2, one, one, bf16_values(norm, 1)]
    out = torch.zeros(len(x), BOUND_COLUMNS, dtype=torch.float32, device=x.device)
    out[:, :7] = torch.stack(terms, 1)
    return out


def linear_bound(lin, quad):
    """lin^2 / (4 |quad|) elementwise, float64: 0 where lin is 0, inf where only quad is."""
    return torch.where(lin == 0, 0.0, lin * lin / (4 * quad.abs()))


def search_weights(params, device) -> SearchWeights:
    """The ``SearchWeights`` of natural parameters (their largest constant split off,
    ``params.split_offset``), worked out in float64 by torch (``kernels.candidate_weights``
    fuses this with the E-step's other weights)."""
    lin, quad, const = (t.to(device=device, dtype=torch.float64) for t in (params.lin, params.quad, params.const))
    diagonal = quad.dim() == 2
    c, eps, slack = fold_factors(lin.shape[1], diagonal)
    piece = torch.bfloat16 if split_dtype(lin.device) == tl.bfloat16 else torch.float32
    lin_t = lin.float().to(torch.bfloat16).double()
    if diagonal:
        bias = const + eps * linear_bound(lin_t, quad).sum(1)
        lin_t, quad_t = lin_t.to(piece), (c * quad).float().to(torch.bfloat16).to(piece)
        return SearchWeights(lin_t, quad_t, _rounded_up(bias), torch.cat([lin_t, quad_t], 1))
    norm = _rounded_up(torch.linalg.vector_norm(lin_t, dim=1))
    return SearchWeights(lin_t.to(piece), columns=bound_columns(quad, const, norm, c, eps, slack).to(piece))


def check_block_k(block_k: int) -> None:
    """Refuse component tiles that would split a word of marks."""
    if block_k % 32:
        raise ValueError(f"the candidate pass packs 32 components a word: block_k must be a multiple of 32, "
                         f"got {block_k}")


@triton.jit
def product(acc, x, w_ptr, comps, comp_mask, cols, col_mask, row_stride, EVEN: tl.constexpr = False):
    """acc + x @ w[comps, cols]^T for a tile of pieces x, w's rows ``row_stride`` apart; EVEN: the
    tile lies inside w (unmasked loads: H100, N = 1M, K = 1024, D = 128, diag pass 1.55 against 1.63 ms)."""
    offs = comps[:, None] * row_stride + cols[None, :]
    if EVEN:
        w = tl.load(w_ptr + offs)
    else:
        w = tl.load(w_ptr + offs, mask=comp_mask[:, None] & col_mask[None, :], other=0.0)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def bound_rows(sq, x_norm, SPLIT_DTYPE: tl.constexpr):
    """(BLOCK_N, 16): the row side of the spherical bound's columns, [s1, s1, s2, s2, 1, 1, r~, 0 ...]
    from each row's float32 |x|^2 and ||x~|| (module docstring)."""
    s1 = round_bf16(sq)
    s2 = round_bf16_directed(sq - s1, False)
    r = round_bf16_directed(x_norm, True)
    j = tl.arange(0, 16)[None, :]
    terms = tl.where(j < 2, s1[:, None], tl.where(j < 4, s2[:, None], tl.where(j == 6, r[:, None], 0.0)))
    return tl.where((j == 4) | (j == 5), 1.0, terms).to(SPLIT_DTYPE)


@triton.jit
def upper_bound(acc, row_terms, bound_ptr, comps, comp_mask, DIAGONAL: tl.constexpr, EVEN_K: tl.constexpr):
    """U of the module docstring from a (BLOCK_N, BLOCK_K) tile of products, -inf for padded
    components: diag + b_k (``bound_ptr``: ``SearchWeights.bias``); spherical, the product of
    ``row_terms`` (``bound_rows``) and the components' columns (``SearchWeights.columns``) added to
    the same accumulator. EVEN_K: no padded components."""
    if DIAGONAL:
        bias = tl.load(bound_ptr + comps, mask=comp_mask, other=float("-inf"))
        acc = acc + bias[None, :]
    else:
        cols = tl.arange(0, 16)
        acc = product(acc, row_terms, bound_ptr, comps, comp_mask, cols, cols < 16, 16, EVEN_K)
        if not EVEN_K:
            acc = tl.where(comp_mask[None, :], acc, float("-inf"))
    return acc


@triton.jit
def candidates_kernel(x_ptr, stride_x, shift_ptr, w_ptr, bound_ptr, mean_ptr, prec_ptr, const_ptr,
                      hint_ptr, margin, mark_ptr, n_rows, n_comps, n_cols, n_words,
                      DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      EVEN: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    x_f = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols)
    # The floor from the rows in registers, where a separate pass re-reads them and gathers the hints
    # at full occupancy: H100, N = 1M, K = 1024, D = 128, through ``fit``, diag 3.24 ms an iteration
    # against 3.32 with the separate pass (0.17 ms, for 0.10 off this pass), spherical 2.92 against
    # 3.00-3.05 (ab_candidate_floor_pass_h100.txt).
    hint = tl.load(hint_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    floor = exact_log_prob(x_ptr, stride_x, shift_ptr, x_f, mean_ptr, prec_ptr, const_ptr, rows, row_mask, hint,
                           n_cols, DIAGONAL, True, BLOCK_D) - margin
    floor = mark_floor(floor, row_mask)
    xx_f = x_f * x_f
    x, _ = split(x_f, "bf16", SPLIT_DTYPE)
    row_terms = x
    w_cols, w_mask, w_stride = cols, col_mask, n_cols
    if DIAGONAL:
        # One product of depth 2 D, [x~ | xx~] against [lin~ | q~], where two of depth D wait for
        # each other (H100, N = 1M, K = 1024, D = 128, the pass through ``fit`` 1.59 against 1.73 ms,
        # ``bench_fit_profile_8e64227_k1024_h100.json`` against ``bench_fit_profile_ee3fdbf_k1024_h100.json``).
        xx, _ = split(xx_f, "bf16", SPLIT_DTYPE)
        x = tl.reshape(tl.permute(tl.join(x, xx), (0, 2, 1)), (BLOCK_N, 2 * BLOCK_D))
        pos = tl.arange(0, 2 * BLOCK_D)
        # Column pos of the product reads feature pos % BLOCK_D of half pos // BLOCK_D; with D =
        # BLOCK_D that is column pos, which keeps the loads contiguous in the compiler's eyes.
        w_cols = pos if EVEN else pos % BLOCK_D + (pos // BLOCK_D) * n_cols
        w_mask = pos % BLOCK_D < n_cols
        w_stride = 2 * n_cols
    else:
        x_r = x.to(tl.float32)
        row_terms = bound_rows(tl.sum(xx_f, axis=1), tl.sqrt(tl.sum(x_r * x_r, axis=1)), SPLIT_DTYPE)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        acc = product(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), x, w_ptr, comps, comp_mask, w_cols, w_mask,
                      w_stride, EVEN)
        upper = upper_bound(acc, row_terms, bound_ptr, comps, comp_mask, DIAGONAL, EVEN)
        mark(upper, floor, rows, row_mask, k0, mark_ptr, n_words, BLOCK_N, BLOCK_K)


@triton.jit
def mark_floor(floor, row_mask):
    """The floor ``mark`` compares against: +inf for padded rows (they mark nothing), at least
    -FLT_MAX (a row whose hint has weight 0 still leaves out what cannot carry mass: components of
    weight 0 and padded components, whose upper bounds are -inf)."""
    return tl.where(row_mask, tl.maximum(floor, -3.4028234663852886e38), float("inf"))


@triton.jit
def mark(upper, floor, rows, row_mask, k0, mark_ptr, n_words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store a (BLOCK_N, BLOCK_K) tile's marks, bit c % 32 of word c // 32 of its row set where
    component c's upper bound reaches the row's floor (``mark_floor``); BLOCK_K and k0 are
    multiples of 32.

    The masks are in the floor and the bounds, so an entry costs a compare, a select and an add
    (with both masks applied to each entry, as well, a diag iteration through ``fit`` took 3.63 ms
    against 3.29 with this and the joined product, ``bench_fit_ab_base_fdc1639_k1024_h100.json``
    against ``bench_fit_ab_8e64227_k1024_h100.json``). A sum per 32 columns rather than a small
    product of the 0/1 tile with powers of two (which keeps the tile out of shared memory): with the
    product the pass takes 2.05 / 1.37 ms diag / spherical against 1.79 / 1.20 (H100, N = 1M,
    K = 1024, D = 128, ``bench_fit_candidates_profile_h100.json``)."""
    pow2 = (1 << (tl.arange(0, BLOCK_K) % 32)).to(tl.uint32)
    bits = tl.where(upper >= floor[:, None], pow2[None, :], 0)
    # Distinct bits: their sum is their bitwise or.
    words = tl.sum(tl.reshape(bits, (BLOCK_N, BLOCK_K // 32, 32)), axis=2)
    word = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    offs = rows.to(tl.int64)[:, None] * n_words + word[None, :]
    tl.store(mark_ptr + offs, words.to(tl.int32, bitcast=True), mask=row_mask[:, None] & (word < n_words)[None, :])


def n_words(n_comps: int) -> int:
    """int32 words of one row's marks."""
    return -(-n_comps // 32)


def candidates(x, shift, weights, centred, hint, margin, config):
    """Launch the candidate pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    weights : SearchWeights
    centred : (means, precisions, consts), float32, the exact form of the same mixture
        (``exact_candidates.centred_params``)
    hint : integer Tensor of shape (n,): each row's floor is the exact log-density of component
        ``hint[n]`` (``kernels.exact_log_prob``) less ``margin``
    margin : float, nats
    config : LaunchConfig (block_k a multiple of 32)

    Returns
    -------
    marks : int32 Tensor of shape (n, ceil(K / 32)), bit c % 32 of word c // 32 set for every
        candidate c of the row
    """
    n, d = x.shape
    check_block_k(config.block_k)
    if d > config.block_d:
        raise ValueError(f"the fused candidate pass holds a row in one feature tile: D = {d} exceeds block_d = "
                         f"{config.block_d} (wider rows: kernels.candidates_wide)")
    marks = torch.empty(n, n_words(weights.n_comps), dtype=torch.int32, device=x.device)
    diagonal = weights.diagonal
    candidates_kernel[(triton.cdiv(n, config.block_n),)](
        x, x.stride(0), shift, *((weights.lin_quad, weights.bias) if diagonal else (weights.lin, weights.columns)),
        *centred, hint.contiguous(), float(margin), marks, n, weights.n_comps, d, marks.shape[1], DIAGONAL=diagonal,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_D=config.block_d,
        EVEN=weights.n_comps % config.block_k == 0 and d == config.block_d, SPLIT_DTYPE=split_dtype(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return marks
