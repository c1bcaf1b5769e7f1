"""The fused E-step launcher: pass 1 (log Z) then pass 2 (statistics)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from . import exact_candidates, gemm
from .candidate_weights import candidate_weights
from .candidates import candidates
from .candidates_wide import candidates_wide
from .log_norm import log_norm as _launch_log_norm
from .params import NaturalParams, kernel_weights, split_offset
from .result import EStepResult
from .stats import stats as _launch_stats

PRECISIONS = ("bf16x3", "tf32x3", "ieee", "tf32", "bf16", "candidates")
# log Z alone (``log_norm``) is one dense pass: the candidate search would not save work there.
_LOG_NORM_PRECISION = {"candidates": "bf16x3"}
# Partial statistics of the row splits stay under this many bytes (the N=10M
# memory bar is "input + 64 MB").
PARTIALS_BUDGET = 36 << 20
# Rows at least this wide take the "bf16x3" and "bf16" E-steps as library products on a GPU (``kernels.gemm``),
# by covariance type: beyond one 128-wide feature tile the fused kernels re-read every row tile
# per component tile. Measured on an H100, N = 100K, K = 1024 (bench_estep_gemm_h100.json), ms
# per iteration, products / fused: diag D = 192 4.7 / 5.1, 256 4.6 / 6.6, 960 6.5 / 33.7;
# spherical D = 192 4.7 / 4.1, 256 4.8 / 4.9, 512 3.7 / 8.2, 960 4.4 / 16.6.
GEMM_FROM_FEATURES = {"diag": 129, "spherical": 256}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8)


def _rows(x, params: NaturalParams, shift, precision):
    """(x, shift) as the kernels read them, checked against ``params``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {tuple(x.shape)}")
    d = x.shape[1]
    if params.lin.shape[1] != d:
        raise ValueError(f"x has {d} features but the parameters have {params.lin.shape[1]}")
    if x.dtype not in _KERNEL_DTYPES:
        x = x.to(torch.float32)
    if x.stride(1) != 1:
        x = x.contiguous()
    if shift is None:
        shift = torch.zeros(d, dtype=torch.float32, device=x.device)
    else:
        shift = shift.to(device=x.device, dtype=torch.float32).contiguous()
    return x, shift


def _prepare(x, params: NaturalParams, shift, precision):
    x, shift = _rows(x, params, shift, precision)
    params, offset = split_offset(params)
    return x, kernel_weights(params, precision, x.device), shift, offset, params


class LaunchConfig(NamedTuple):
    """Tile sizes and launch settings of one pass."""

    block_n: int
    block_k: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    rows_first: bool = False  # pass 1 only: (rows, components) tiles (see kernels.log_norm)


def default_configs(n_features: int, diagonal: bool = True,
                    precision: str = "bf16x3") -> tuple[LaunchConfig, LaunchConfig | None]:
    """(pass 1, pass 2) settings, tuned on an H100 at N=1M, K=1024, D=128 (eval/tune_estep.py).

    Up to D = 128 one feature tile holds a whole row, so the rows are loaded and split once
    per row tile; beyond, 64-wide tiles keep the float32 partial sums short. Both passes must
    share BLOCK_D (see ``estep``). The float32-operand precisions get half-size tiles: their
    operands take twice the shared memory of bf16x3's pieces. Beyond one feature tile, pass 2
    takes 32 components a program: its (splits, K, D) partials then allow few row splits,
    and the grid is (K tiles, splits) (bf16 pieces; float32 operands keep 64).
    """
    block_d = max(16, triton.next_power_of_2(n_features)) if n_features <= 128 else 64
    if precision == "candidates":
        # The candidate pass (``kernels.candidates``): timed on an H100 at N = 1M rows of
        # bench_estep's D = 128 cell, K = 1024 (Triton 3.6), when diag rows took two products a tile
        # pair: diag (128, 128) tiles with 8 warps, 2 stages 1.55 ms, 4 warps 1.85, (128, 64) with
        # 4 warps, 3 stages 2.07, (64, 128) 1.98; spherical (one product) (128, 128) with 4 warps
        # 1.09, with 8 warps 1.51, (128, 256) with 8 warps 1.29, (128, 64) with 4 warps, 3 stages
        # 1.30, (64, 128) 1.24. (128, 128) diag tiles at 3 stages, and (128, 256) or (256, 128) at
        # 2, exceed an H100's shared memory. Diag (256, 64) tiles with 16 warps, 3 stages read each
        # component tile's weights once per 256 rows: on the byte rows a fit holds, 1.67 against 1.80 ms
        # alone, and through ``fit`` (torch.profiler, N = 1M, K = 1024) 1.39 against 1.58 ms an
        # iteration, the GPU's busy time 3.12 against 3.31 (ab_candidate_tiles_h100.json; spherical
        # keeps (128, 128): 1.12 ms alone, (256, 128) with 8 warps, 3 stages 1.20, and 1.11 against
        # 1.00 through ``fit``). Its exact pass picks its own tiles (``candidate_resp``).
        if n_features > block_d:
            # ``kernels.candidates_wide``, GEMM-like tiles over split rows: H100, N = 100K, K = 1024,
            # D = 960, (BLOCK_N, BLOCK_K) with 8 warps, 3 stages: diag (128, 128) 1.80 ms, (128, 64)
            # with 4 warps 2.79, (64, 128) with 4 warps 1.63 (D = 256: 0.47, 0.71, 0.61); spherical
            # (128, 128) 0.86, (128, 64) 1.15, (64, 128) with 4 warps 0.88. (128, 256) tiles and
            # 4 stages exceed an H100's shared memory.
            return LaunchConfig(128, 128, block_d, 8, 3, True), None
        if diagonal:
            return LaunchConfig(256, 64, block_d, 16, 3, True), None
        return LaunchConfig(128, 128, block_d, 4, 2, True), None
    bf16 = precision in ("bf16x3", "bf16")
    if not bf16:
        first, second = LaunchConfig(64, 64, block_d, 4, 1, True), LaunchConfig(64, 64, block_d, 8, 1)
    elif diagonal:
        first, second = LaunchConfig(128, 128, block_d, 8, 1, True), LaunchConfig(64, 128, block_d, 8, 2)
    elif precision == "bf16":
        # One product per tile pair leaves registers for 4-warp programs (tuned: 4.43 against
        # 4.95 ms per iteration with bf16x3's tiles, eval/results/tune_estep_spherical_bf16_h100.json).
        first, second = LaunchConfig(128, 128, block_d, 4, 2, True), LaunchConfig(32, 128, block_d, 4, 2)
    else:
        first, second = LaunchConfig(128, 64, block_d, 8, 1, True), LaunchConfig(128, 128, block_d, 8, 1)
    if n_features > block_d:
        # Float32 operands keep 64 components: at 32, tf32x3's products round differently from
        # pass 1's (measured at D = 1030: responsibilities summing to 1 - 1e-6, s1 off by 5e-5,
        # against 1e-5 at 64, the float32 floor).
        second = LaunchConfig(64, 32 if bf16 else 64, block_d, 4, 2 if bf16 else 1)
    return first, second


def log_norm(x, params: NaturalParams, shift=None, *, precision="bf16x3", config=None):
    """log Z_n and argmax_k (log pi_k + log N(x_n | k)) for every row, by the Triton kernel (see
    ``estep`` for the rows that take library products instead).

    Parameters
    ----------
    x : Tensor of shape (n, D), float32/float16/bfloat16/uint8/int8 (others are cast to float32)
    params : NaturalParams relative to ``shift``
    shift : Tensor of shape (D,) or None

    Returns
    -------
    log_norm : float64 Tensor of shape (n,)
    best : int32 Tensor of shape (n,)
    """
    precision = _LOG_NORM_PRECISION.get(precision, precision)
    x, weights, shift, offset, _ = _prepare(x, params, shift, precision)
    if config is None and _library_products(x, weights, precision):
        lz, best = gemm.log_norm(x, shift, weights, precision=precision)
    else:
        config = config or default_configs(x.shape[1], weights.diagonal, precision)[0]
        lz, best = _launch_log_norm(x, shift, weights, precision, config)
    return lz.double() + offset, best


def candidate_hints(hints: dict, key, x, params: NaturalParams, shift=None) -> exact_candidates.Hints:
    """The ``hints`` of ``estep(precision="candidates")`` for a block of rows, kept in the dict
    ``hints`` under ``key`` (say, its first row's index) from one E-step to the next: the block's
    best components of its last E-step, or, the first time or when the block changed size, those of
    a "bf16" ranking pass (``log_norm``)."""
    got = hints.get(key)
    if got is None or got.best.shape[0] != x.shape[0]:
        best = log_norm(x, params.to(dtype=torch.float32), shift, precision="bf16")[1]
        got = hints[key] = exact_candidates.Hints(best)
    return got


def _library_products(x, weights, precision) -> bool:
    """Whether the "bf16x3" or "bf16" E-step of these rows runs as cuBLAS products (``kernels.gemm``)."""
    wide = GEMM_FROM_FEATURES["diag" if weights.diagonal else "spherical"]
    return gemm.AVAILABLE and precision in gemm.PRECISIONS and x.device.type == "cuda" and x.shape[1] >= wide


def default_split(n_comps, n_features, diagonal, config, device) -> int:
    """Row splits of pass 2: waves of programs filled, partials within ``PARTIALS_BUDGET``."""
    programs = triton.cdiv(n_comps, config.block_k)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    # float32 partials of one split: N_k, s1 (K, D) and s2 ((K, D) diag, (K,) spherical)
    split_bytes = 4 * (n_comps + n_comps * n_features + (n_comps * n_features if diagonal else n_comps))
    return fullest_waves_split(programs, sms, min(triton.cdiv(4 * sms, programs), PARTIALS_BUDGET // split_bytes))


def fullest_waves_split(programs: int, sms: int, cap: int) -> int:
    """The split count <= ``cap`` whose ``programs * splits`` programs fill their waves best, the
    larger on a tie, for one or two resident programs per SM (pass 2's configurations hold one
    or two), taking the worse of the two.

    A part-filled last wave idles its SMs for a whole program's time. On an H100 (132 SMs),
    spherical bf16, N=1M, D=128: K=1024 (8 component tiles) took 2.12 ms at 31 splits against
    1.99 at 33 or 66; K=4096 (32 tiles) 10.8 ms at 17 against 8.1 at 16 (``eval/bench_ceiling.py
    --splits``; ``bench_ceiling_h100.json``, ``bench_ceiling_k4096_h100.json``).
    """
    def fill(splits):
        return min(programs * splits / (triton.cdiv(programs * splits, slots) * slots) for slots in (sms, 2 * sms))
    return max(range(1, max(1, cap) + 1), key=lambda splits: (fill(splits), splits))


def estep(x, params: NaturalParams, shift=None, *, precision="bf16x3", configs=None,
          n_split=None, hints=None) -> EStepResult:
    """Fused E-step of a diagonal or spherical mixture over a block of rows.

    Returns the per-row log-normalisers and the sufficient statistics
    N_k, sum_n r_nk (x_n - shift), sum_n r_nk (x_n - shift)**2 (diag) or
    sum_n r_nk |x_n - shift|**2 (spherical), without writing the N x K
    responsibilities anywhere.

    Parameters
    ----------
    x : Tensor of shape (n, D) on the device the kernels run on (CUDA, or CPU
        under ``TRITON_INTERPRET=1``)
    params : NaturalParams relative to ``shift``
    shift : Tensor of shape (D,) or None
    precision : one of ``PRECISIONS`` (see ``kernels.tile``; "candidates": ``kernels.exact_candidates``)
    configs : (pass 1, pass 2) LaunchConfig, or None for ``default_configs``
    n_split : row splits of pass 2, or None to fill the device within ``PARTIALS_BUDGET``
    hints : ``exact_candidates.Hints`` of the rows, "candidates" only: each row's best component
        from an earlier E-step (``candidate_hints`` keeps them per block of rows), read as its
        threshold's component and overwritten with this E-step's best. Any components give
        the same statistics; the rows' best give the fewest candidates (no ranking pass).
        While a CUDA graph captures the E-step, it takes its sizes from the hints
        (``exact_candidates.estep(static=True)``; ``hints.short`` says if they fell short).

    On a GPU, "bf16x3" and "bf16" rows of at least ``GEMM_FROM_FEATURES`` features take the same
    products as cuBLAS matrix products (``kernels.gemm``) unless ``configs`` or ``n_split``
    is given.

    Returns
    -------
    EStepResult, all float64.
    """
    if precision == "candidates":
        return _estep_candidates(x, params, shift, configs, hints)
    if hints is not None:
        raise ValueError(f"hints are read by precision='candidates' only, not {precision!r}")
    x, weights, shift, offset, _ = _prepare(x, params, shift, precision)
    if configs is None and n_split is None and _library_products(x, weights, precision):
        result = gemm.estep(x, shift, weights, precision=precision)
        return result._replace(log_norm=result.log_norm + offset)
    n, d = x.shape
    k = weights.n_comps
    f64 = dict(dtype=torch.float64, device=x.device)
    if n == 0:
        s2_shape = (k, d) if weights.diagonal else (k,)
        return EStepResult(torch.empty(0, **f64),
                           torch.zeros(k, **f64), torch.zeros(k, d, **f64), torch.zeros(s2_shape, **f64))
    first, second = configs or default_configs(d, weights.diagonal, precision)
    if first.block_d != second.block_d:
        # r = exp(ll - log Z) sums to one only if pass 2 recomputes ll with pass 1's rounding:
        # a different D tiling groups the float32 sums differently (measured: 1.5e-4 error in N_k).
        raise ValueError(f"both passes need the same block_d, got {first.block_d} and {second.block_d}")
    lz, _ = _launch_log_norm(x, shift, weights, precision, first)
    n_split = n_split or default_split(k, d, weights.diagonal, second, x.device)
    nk, s1, s2 = _launch_stats(x, shift, weights, lz, n_split, precision, second)
    return EStepResult(lz.double() + offset, _sum_splits(nk), _sum_splits(s1), _sum_splits(s2))


def candidate_search(x, shift, weights, search_w, configs=None):
    """The search of ``exact_candidates.estep`` for rows like ``x``: (rows, centred, margin, hint)
    -> marks, by the candidate pass with ``search_w`` (``candidates.SearchWeights``) and
    ``configs[0]``: ``kernels.candidates`` for rows within one feature tile,
    ``kernels.candidates_wide`` for wider ones. Each row's threshold is the exact log-density of its
    hint less the margin; without hints, the first of a "bf16" ranking pass with ``weights``
    (``kernels.log_norm``, or library products for wide rows on a GPU when no ``configs``)."""
    d = x.shape[1]
    library = configs is None and _library_products(x, weights, "bf16")
    config = (configs or default_configs(d, weights.diagonal, "candidates"))[0]
    rank = default_configs(d, weights.diagonal, "bf16")[0] if configs is None else config
    search_pass = candidates if d <= config.block_d else candidates_wide

    def search(rows, centred, margin, hint=None):
        if hint is None:
            ranked = gemm.log_norm(rows, shift, weights, precision="bf16") if library else \
                _launch_log_norm(rows, shift, weights, "bf16", rank)
            hint = ranked[1]
        return search_pass(rows, shift, search_w, centred, hint, margin, config)
    return search


def _capturing(x) -> bool:
    """Whether a CUDA graph is capturing the work on ``x`` (which must then not read the host)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _estep_candidates(x, params, shift, configs, hints):
    """``exact_candidates.estep`` with ``candidate_search``, static while a CUDA graph captures it;
    rows that overflow their candidate capacity take the dense "bf16x3" E-step (host-sized)."""
    x, shift = _rows(x, params, shift, "bf16")
    if x.shape[0] == 0:
        return estep(x, params, shift, precision="bf16x3")
    best = None if hints is None else hints.best
    if best is not None and (best.shape != (x.shape[0],) or best.dtype != torch.int32 or best.device != x.device
                             or not best.is_contiguous()):
        raise ValueError(f"hints.best must be a contiguous int32 tensor of shape ({x.shape[0]},) on {x.device}, got "
                         f"{best.dtype} of shape {tuple(best.shape)} on {best.device}")
    weights, search_w, centred, offset = candidate_weights(params, x.device)

    def dense(rows):
        result = estep(rows, params, shift, precision="bf16x3")
        return result._replace(log_norm=result.log_norm - offset)
    result, _ = exact_candidates.estep(x, centred, shift, weights.diagonal,
                                       candidate_search(x, shift, weights, search_w, configs), dense, hints=hints,
                                       static=_capturing(x))
    return result._replace(log_norm=result.log_norm + offset)


def _sum_splits(partials: torch.Tensor) -> torch.Tensor:
    """Sum over the leading split axis, then widen to float64.

    Each partial is already a float32 sum over thousands of rows, so adding a few dozen of
    them in float32 costs nothing measurable; ``sum(dtype=float64)`` would instead first copy
    every partial to float64 (measured: +32 MB at K=1024, D=128, N=10M).
    """
    return partials.sum(0).double()
