"""Candidate pass of the exact-on-candidates E-step: every component that can matter to a row.

One program owns BLOCK_N rows, loaded and split once (a row fits one feature tile: D <= BLOCK_D;
wider rows take ``kernels.candidates_wide``), and streams over all K components in (BLOCK_N, BLOCK_K) tiles of
log-densities computed from bfloat16-rounded operands (``tile``'s one-product "bf16" scheme). Each approximate
log-density l~ comes with a proven error bound e_nk >= |l~ - l|:

    diag:      e_nk = EPS * ((1 + R) Q_nk + C_k)               + 2^-20 |l~|
    spherical: e_nk = EPS' * ||lin~_k|| ||x~_n||               + 2^-20 |l~|

(2^-20 |l~|: float32 constants and sums). Rounding a to a~ (bfloat16, u = 2^-8) gives |a~ b~ - a b|
<= (2u + u^2) |a| |b| and |a| <= |a~| / (1 - u); EPS (``bound_eps``) is (2u + u^2) / (1 - u)^2 with
room for the float32 sums of the products, and EPS' (``norm_bound_eps``) adds room for the float32
norms. A diagonal model's error follows each term's size, S = |lin~_k| . |x~_n| + |quad~_k| . xx~_n
(xx~ = the rounded x^2). Its quad part Q_nk = |quad~_k| . xx~_n is the negated quad part of l~ itself
(quad~ is -1/2 the precisions, never positive): free. Its linear part is bounded feature by feature
by |a b| <= t a^2 + b^2 / (4 t) with t = |quad~|: |lin~_k| . |x~_n| <= |quad~_k| . x~_n^2 + C_k, where
C_k = sum_d lin~_kd^2 / (4 |quad~_kd|) is one number per component (``bound_weights``, rounded up)
and x~^2 <= R xx~ (``QUAD_FACTOR`` = 1 + R). So the bound costs no product: the pass makes the
log-density's two. What it adds over S is EPS sum_d (sqrt|quad~_kd| |x~_d| - |lin~_kd| / (2
sqrt|quad~_kd|))^2 (at most EPS times the row's Mahalanobis term to component k) and EPS (R - 1) Q:
under a nat at a row's best component, where the marks are decided (float64 replay on real SIFT
rows across EM, ``eval/results/check_candidates_diag_sift_cpu.json``: 5.9-57.9 nats there against
5.0-57.3 for the elementwise bound, which took a third product). A norm (Cauchy-Schwarz)
bound is tens of nats loose on fitted SIFT models, whose variances differ by orders of magnitude
between features. A spherical model's linear weights are its means times one precision; there the
norm bound costs no product and stays within a few nats (float64 replay on real SIFT rows across
EM, K = 1024: 1.3-4.0 nats at the row's best component, 12-23 candidates per row on average,
``eval/results/check_candidates_spherical_sift_cpu.json``).

Each row comes with a threshold (``exact_candidates``: the exact log-density of one component,
less the margin), and a component is marked when its upper bound l~ + e reaches it: nothing
whose exact log-density is within the margin of the row's best is ever left out. The marks are
one bit per (row, component), packed 32 components to an int32 word, (n, ceil(K / 32)) words:
a tile's marks are one sum per 32 of its columns and one store per word, where writing the
candidates into per-row slots took a prefix sum and a scattered store per tile (H100, N = 1M,
K = 1024, D = 128, diag: 4.7 against 2.4 ms, the products alone 2.1). The exact pass
(``kernels.candidate_resp``) turns the marks into slots.

Oracle: the float64 log-densities of ``kernels.reference`` (tests/test_exact_candidates.py).
"""
import torch
import triton
import triton.language as tl

from .tile import finish_log_prob, log_prob_part, row_operands, split_dtype

_U = 2.0 ** -8  # bfloat16 unit round-off
# Relative slack for the float32 parts of a log-density (constants, the spherical |x|^2 term).
FLOAT32_SLACK = 2.0 ** -20


def bound_eps(n_terms: int) -> float:
    """EPS of the module docstring for log-densities that sum ``n_terms`` products.

    Operand rounding gives (2u + u^2) / (1 - u)^2 of S = sum |a~| |b~|; the float32 sum of the
    log-density's products adds at most g S, g = n u32 / (1 - n u32) (Higham's gamma_n); and the
    float32 bound product itself may come out as low as (1 - g) S.
    """
    gamma = n_terms * 2.0 ** -24 / (1 - n_terms * 2.0 ** -24)
    return ((2 * _U + _U * _U) / (1 - _U) ** 2 + gamma) / (1 - gamma)


# 1 + R: x~^2 <= R xx~ for x~ = bf16(x), xx~ = bf16(float32(x * x)).
QUAD_FACTOR = 1.0 + (1 + _U) ** 2 / ((1 - _U) * (1 - 2.0 ** -24))


def n_terms(n_features: int, diagonal: bool) -> int:
    """Products summed in one log-density: x . lin and x^2 . quad (diag), x . lin (spherical)."""
    return 2 * n_features if diagonal else n_features


def norm_bound_eps(n_features: int) -> float:
    """EPS' of the module docstring: EPS over float32 norms that may fall short of the exact
    ||lin~|| ||x~|| by the rounding of a sum of ``n_features`` squares, two square roots, the
    weights' norms rounded to float32 and their product."""
    return bound_eps(n_features) / (1 - (n_features + 8) * 2.0 ** -24)


def bound_factor(n_features: int, diagonal: bool) -> float:
    """The bound's factor of a candidate pass: EPS (diag) or EPS' (spherical)."""
    return bound_eps(n_terms(n_features, True)) if diagonal else norm_bound_eps(n_features)


def check_block_k(block_k: int) -> None:
    """Refuse component tiles that would split a word of marks."""
    if block_k % 32:
        raise ValueError(f"the candidate pass packs 32 components a word: block_k must be a multiple of 32, "
                         f"got {block_k}")


def bound_weights(weights):
    """The weights of the error bound, (K,) float32: C_k of the module docstring (diag), rounded
    up; ||lin~_k|| (spherical)."""
    lin = weights.lin_hi.double()
    if weights.diagonal:
        return linear_bound(lin, weights.quad_hi.double()).sum(1).mul(1 + 2.0 ** -22).float()
    return torch.linalg.vector_norm(lin, dim=1).float()


def linear_bound(lin, quad):
    """lin^2 / (4 |quad|) elementwise, float64: 0 where lin is 0, inf where only quad is."""
    return torch.where(lin == 0, 0.0, lin * lin / (4 * quad.abs()))


@triton.jit
def _tile_part(x, xx, lin_ptr, quad_ptr, comps, comp_mask, cols, n_cols, DIAGONAL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One feature tile's (log-density part, Q part), (BLOCK_N, BLOCK_K); spherical models' Q
    part is 0 (``candidates_kernel`` takes their bound from the norms)."""
    lin = log_prob_part(lin_ptr, lin_ptr, lin_ptr, lin_ptr, comps, comp_mask, cols, n_cols,
                        x, x, x, x, False, BLOCK_K, BLOCK_N, "bf16", True)
    if DIAGONAL:
        quad = log_prob_part(quad_ptr, quad_ptr, quad_ptr, quad_ptr, comps, comp_mask, cols, n_cols,
                             xx, xx, xx, xx, False, BLOCK_K, BLOCK_N, "bf16", True)
        return lin + quad, -quad
    return lin, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)


@triton.jit
def _rounded_sq(x):
    """Each row's sum of squares of a tile of bfloat16-rounded values, in float32."""
    x = x.to(tl.float32)
    return tl.sum(x * x, axis=1)


@triton.jit
def candidates_kernel(x_ptr, stride_x, shift_ptr, lin_ptr, quad_ptr, const_ptr, bound_w_ptr, floor_ptr,
                      mark_ptr, n_rows, n_comps, n_cols, n_words, eps, quad_factor, slack,
                      DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    x, _, xx, _, sq_norm = row_operands(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols,
                                        DIAGONAL, "bf16", SPLIT_DTYPE)
    floor = tl.load(floor_ptr + rows, mask=row_mask, other=0.0)
    if not DIAGONAL:
        x_norm = tl.sqrt(_rounded_sq(x))
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + tl.arange(0, BLOCK_K)
        comp_mask = comps < n_comps
        ll, quad = _tile_part(x, xx, lin_ptr, quad_ptr, comps, comp_mask, cols, n_cols, DIAGONAL, BLOCK_N, BLOCK_K)
        bound_w = tl.load(bound_w_ptr + comps, mask=comp_mask, other=0.0)
        if DIAGONAL:
            err = quad_factor * quad + bound_w[None, :]
        else:
            err = x_norm[:, None] * bound_w[None, :]
        ll = finish_log_prob(ll, sq_norm, quad_ptr, const_ptr, comps, comp_mask, DIAGONAL, True)
        mark(ll + bound_error(ll, err, eps, slack), floor, rows, row_mask, comps, comp_mask, k0, mark_ptr, n_words,
             BLOCK_N, BLOCK_K)


@triton.jit
def bound_error(ll, bound, eps, slack):
    """e >= |l~ - l| from approximate log-densities and their error-bound product."""
    # min(): -inf log-densities keep a finite bound, so l~ +- e stays -inf (not NaN).
    return eps * bound + slack * tl.minimum(tl.abs(ll), 3.0e38)


@triton.jit
def mark(upper, floor, rows, row_mask, comps, comp_mask, k0, mark_ptr, n_words, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):
    """Store a (BLOCK_N, BLOCK_K) tile's marks, bit c % 32 of word c // 32 of its row set where
    component c's upper bound reaches the row's floor; BLOCK_K and k0 are multiples of 32."""
    take = (upper >= floor[:, None]) & row_mask[:, None] & comp_mask[None, :]
    bits = take.to(tl.uint32) << (tl.arange(0, BLOCK_K) % 32).to(tl.uint32)[None, :]
    # Distinct bits: their sum is their bitwise or.
    words = tl.sum(tl.reshape(bits, (BLOCK_N, BLOCK_K // 32, 32)), axis=2)
    word = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    offs = rows.to(tl.int64)[:, None] * n_words + word[None, :]
    tl.store(mark_ptr + offs, words.to(tl.int32, bitcast=True), mask=row_mask[:, None] & (word < n_words)[None, :])


def n_words(n_comps: int) -> int:
    """int32 words of one row's marks."""
    return -(-n_comps // 32)


def candidates(x, shift, weights, floor, config, bound_w=None):
    """Launch the candidate pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), unit column stride
    shift : float32 Tensor of shape (D,)
    weights : KernelWeights laid out for precision "bf16"
    floor : float32 Tensor of shape (n,), each row's threshold (the exact log-density of a
        component, less the margin)
    config : LaunchConfig (``rows_first`` tiles, block_k a multiple of 32)
    bound_w : ``bound_weights(weights)``, or None to compute it here

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
        x, x.stride(0), shift, weights.lin_hi, weights.quad_hi, weights.const,
        bound_weights(weights) if bound_w is None else bound_w, floor, marks, n, weights.n_comps, d,
        marks.shape[1], bound_factor(d, weights.diagonal), QUAD_FACTOR, FLOAT32_SLACK,
        DIAGONAL=weights.diagonal, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_D=config.block_d, SPLIT_DTYPE=split_dtype(x.device),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return marks
