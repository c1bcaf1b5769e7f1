"""Candidate pass of the exact-on-candidates E-step: every component that can matter to a row.

One program owns BLOCK_N rows, loaded and split once (a row fits one feature tile: D <= BLOCK_D;
wider rows take ``kernels.candidates_wide``), and streams over all K components in (BLOCK_N, BLOCK_K)
tiles. Each tile yields, for every (row, component), a proven upper bound U_nk of the exact
log-density l_nk = const_k + lin_k . x_n + quad_k . x_n^2 (quad = -1/2 the precisions) from one
float32 accumulator of bfloat16 products and one addition: the rounding error's bound is folded into
the weights (``search_weights``), so the pass costs what the products cost.

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

Spherical. One product, P = lin~ . x~, and the |x|^2 term in float32:

    U_nk = P_nk + q'_k |x_n|^2 + eps' ||x~_n|| w_k + b_k,   q' = quad (1 - g' - 2^-20), w_k = ||lin~_k||,

where |lin~ . x~ - lin . x| <= (a + g') ||lin~|| ||x~|| (g' = gamma_D), the float32 |x|^2 is within
g' of the exact one and q' gives that up (plus the rounding of the two fused multiply-adds
that carry Q), and eps' also covers the norms' float32 rounding and those additions' share of
|P| (``fold_factors``). A spherical model's linear weights are its means times one precision:
the norm bound stays within a few nats (float64 replay on real SIFT rows across EM, K = 1024:
1.3-4.0 nats at the row's best component, ``eval/results/check_candidates_spherical_sift_cpu.json``).

Rounding is monotonic, so the last addition needs no slack: if l_nk reaches a float32 floor, so
does the float32 U_nk. b_k is rounded up from float64, -inf for components of weight 0.

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
from .tile import split, split_dtype
from .truncated_select import load_rows

# bfloat16 unit round-off, with room for rounding float64 through float32 on the way.
_U = 2.0 ** -8 + 2.0 ** -22


def _gamma(n_terms: int) -> float:
    """Higham's gamma_n for sums of n terms at 2^-23 per addition (round to nearest or not)."""
    t = n_terms * 2.0 ** -23
    return t / (1 - t)


def fold_factors(n_features: int, diagonal: bool) -> tuple[float, float]:
    """(c, eps) of the module docstring: diag, the quad weights' factor c and C_k's factor eps;
    spherical, the quad factor 1 - g' - 2^-20 and eps', the factor of ||x~|| ||lin~||. Both with
    room for their rounding to float32 (Triton passes Python floats as float32 scalars)."""
    a = (2 * _U + _U * _U) / (1 - _U) ** 2
    if diagonal:
        g = _gamma(2 * n_features)
        c, eps = (1 - (a + g) * (1 + _U) ** 2) / ((1 + _U) ** 2 * (1 + g)), a + g
    else:
        g = _gamma(n_features)
        # The float32 norm of x~ may fall short by the rounding of D squares, their sum, the square
        # root and its product with eps'.
        c, eps = 1 - g - 2.0 ** -20, (a + g + 2.0 ** -21) / (1 - (n_features + 8) * 2.0 ** -24)
    return c * (1 - 2.0 ** -22), eps * (1 + 2.0 ** -22)


class SearchWeights(NamedTuple):
    """The candidate pass's operands (module docstring).

    Attributes
    ----------
    lin : (K, D) Tensor, lin~ (bfloat16 values; float32 under the interpreter)
    quad : (K, D) Tensor of q~ = bf16(c quad) like ``lin`` (diag), or (K,) float32 q' (spherical)
    bias : (K,) float32 Tensor, b_k rounded up (-inf for components of weight 0)
    norm : (K,) float32 Tensor, ||lin~_k|| rounded up (spherical), None (diag)
    eps : float, eps' (spherical), 0 (diag: folded into ``bias``)
    lin_quad : (K, 2 D) Tensor [lin~ | q~] (diag), None (spherical): the fused pass's one operand
    """

    lin: torch.Tensor
    quad: torch.Tensor
    bias: torch.Tensor
    norm: torch.Tensor | None
    eps: float
    lin_quad: torch.Tensor | None = None

    @property
    def diagonal(self) -> bool:
        return self.quad.dim() == 2

    @property
    def n_comps(self) -> int:
        return self.lin.shape[0]


def _rounded_up(t: torch.Tensor) -> torch.Tensor:
    """float32 values >= the float64 ones (infinities kept)."""
    return torch.where(torch.isfinite(t), t + 2.0 ** -23 * t.abs(), t).float()


def linear_bound(lin, quad):
    """lin^2 / (4 |quad|) elementwise, float64: 0 where lin is 0, inf where only quad is."""
    return torch.where(lin == 0, 0.0, lin * lin / (4 * quad.abs()))


def search_weights(params, device) -> SearchWeights:
    """The ``SearchWeights`` of natural parameters (their largest constant split off,
    ``params.split_offset``), worked out in float64 by torch (``kernels.candidate_weights``
    fuses this with the E-step's other weights)."""
    lin, quad, const = (t.to(device=device, dtype=torch.float64) for t in (params.lin, params.quad, params.const))
    diagonal = quad.dim() == 2
    c, eps = fold_factors(lin.shape[1], diagonal)
    piece = torch.bfloat16 if split_dtype(lin.device) == tl.bfloat16 else torch.float32
    lin_t = lin.float().to(torch.bfloat16).double()
    if diagonal:
        bias = const + eps * linear_bound(lin_t, quad).sum(1)
        lin_t, quad_t = lin_t.to(piece), (c * quad).float().to(torch.bfloat16).to(piece)
        return SearchWeights(lin_t, quad_t, _rounded_up(bias), None, 0.0, torch.cat([lin_t, quad_t], 1))
    return SearchWeights(lin_t.to(piece), (c * quad).float(), _rounded_up(const),
                         _rounded_up(torch.linalg.vector_norm(lin_t, dim=1)), eps)


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
def upper_bound(acc, sq, x_norm, quad_ptr, bias_ptr, norm_ptr, eps, comps, comp_mask, DIAGONAL: tl.constexpr):
    """U of the module docstring from a (BLOCK_N, BLOCK_K) tile of products: + b_k (diag);
    + q'_k |x_n|^2 + eps' ||x~_n|| w_k + b_k (spherical); -inf for padded components."""
    bias = tl.load(bias_ptr + comps, mask=comp_mask, other=float("-inf"))
    if not DIAGONAL:
        quad = tl.load(quad_ptr + comps, mask=comp_mask, other=0.0)
        norm = tl.load(norm_ptr + comps, mask=comp_mask, other=0.0)
        # Fused multiply-adds on the product: an addition to it would become the product's
        # starting accumulator, worked out in another register layout and converted to the
        # product's through shared memory, two (BLOCK_N, BLOCK_K) tiles a step.
        acc = tl.fma(sq[:, None], quad[None, :], acc)
        acc = tl.fma((eps * x_norm)[:, None], norm[None, :], acc)
    return acc + bias[None, :]


@triton.jit
def candidates_kernel(x_ptr, stride_x, shift_ptr, w_ptr, quad_ptr, bias_ptr, norm_ptr, mean_ptr, prec_ptr,
                      const_ptr, hint_ptr, margin, mark_ptr, n_rows, n_comps, n_cols, n_words, eps,
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
    sq = tl.sum(xx_f, axis=1)
    x, _ = split(x_f, "bf16", SPLIT_DTYPE)
    x_norm = sq
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
        x_norm = tl.sqrt(tl.sum(x_r * x_r, axis=1))
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        acc = product(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), x, w_ptr, comps, comp_mask, w_cols, w_mask,
                      w_stride, EVEN)
        upper = upper_bound(acc, sq, x_norm, quad_ptr, bias_ptr, norm_ptr, eps, comps, comp_mask, DIAGONAL)
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
    candidates_kernel[(triton.cdiv(n, config.block_n),)](
        x, x.stride(0), shift, weights.lin if weights.lin_quad is None else weights.lin_quad, weights.quad,
        weights.bias, weights.bias if weights.norm is None else weights.norm, *centred, hint.contiguous(),
        float(margin), marks, n,
        weights.n_comps, d, marks.shape[1], weights.eps, DIAGONAL=weights.diagonal, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, BLOCK_D=config.block_d,
        EVEN=weights.n_comps % config.block_k == 0 and d == config.block_d, SPLIT_DTYPE=split_dtype(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return marks
