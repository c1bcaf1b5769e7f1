"""Overflowed rows of a captured exact-on-candidates E-step, against every component.

A CUDA graph cannot size work from a count it has not read, so a captured E-step
(``exact_candidates.estep(static=True)``) keeps room for a fixed number of rows that overflow their
candidate slots (``Hints.rows``), as ``torch.nonzero_static`` lists them, padded with -1; most of
that room is mostly empty. One program takes one entry: a padding entry returns at once, so the
room costs a launch rather than a dense pass over every entry (torch over the (entries, K, D)
differences: a dozen launches, ~0.3 ms an EM iteration at N = 1M, K = 256, D = 128 on an H100).
A row's log-densities are those of the exact pass (``kernels.exact_log_prob``: float32, centred
differences), its log Z an online log-sum-exp over component tiles; a second sweep writes its
(row, component, r) triples of r >= ``min_resp`` into the caller's buffer, which holds "no pair"
(component K, r 0) everywhere else.

Torch reference: ``overflow_pairs_reference``.
"""
import torch
import triton
import triton.language as tl

from .exact_log_prob import exact_log_prob, feature_tile, row_tile

# Components a program evaluates at once.
BLOCK_K = 64


@triton.jit
def _log_probs(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, comps, comp_mask, n_cols,
               DIAGONAL: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_K,) log-densities of one row (``rows``: its index, once per lane) for ``comps``."""
    return exact_log_prob(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, comp_mask,
                          comps.to(tl.int64), n_cols, DIAGONAL, ONE_TILE, BLOCK_D)


@triton.jit
def overflow_rows_kernel(x_ptr, stride_x, shift_ptr, mean_ptr, prec_ptr, const_ptr, over_ptr, log_norm_ptr, best_ptr,
                         rows_out, comps_out, resp_out, min_resp, n_comps, n_cols, DIAGONAL: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
    entry = tl.program_id(0)
    row = tl.load(over_ptr + entry)
    if row < 0:
        return
    lanes = tl.arange(0, BLOCK_K)
    rows = tl.zeros([BLOCK_K], dtype=tl.int64) + row
    x_tile = row_tile(x_ptr, stride_x, shift_ptr, rows, lanes >= 0, n_cols, BLOCK_K, BLOCK_D, ONE_TILE)
    run_max = tl.full([], -3.0e38, dtype=tl.float32)
    run_sum = tl.zeros([], dtype=tl.float32)
    best = tl.zeros([], dtype=tl.int32)
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + lanes
        ll = _log_probs(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, comps,
                        comps < n_comps, n_cols, DIAGONAL, ONE_TILE, BLOCK_D)
        top = tl.max(ll, axis=0)
        # Strictly larger: the first of equal components stays, as torch's argmax keeps it.
        best = tl.where(top > run_max, k0 + tl.argmax(ll, axis=0), best)
        new_max = tl.maximum(run_max, top)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(ll - new_max), axis=0)
        run_max = new_max
    log_z = run_max + tl.log(run_sum)
    tl.store(log_norm_ptr + row, log_z.to(tl.float64))
    tl.store(best_ptr + row, best.to(tl.int32))
    out = entry.to(tl.int64) * n_comps
    for k0 in range(0, n_comps, BLOCK_K):
        comps = k0 + lanes
        ll = _log_probs(x_ptr, stride_x, shift_ptr, x_tile, mean_ptr, prec_ptr, const_ptr, rows, comps,
                        comps < n_comps, n_cols, DIAGONAL, ONE_TILE, BLOCK_D)
        r = tl.exp(ll - log_z)
        keep = (comps < n_comps) & (r >= min_resp)
        tl.store(rows_out + out + comps, rows.to(tl.int32), mask=keep)
        tl.store(comps_out + out + comps, comps.to(tl.int32), mask=keep)
        tl.store(resp_out + out + comps, r, mask=keep)


def overflow_pairs_into(out, x, over, centred, shift, min_resp, log_norm, best):
    """Launch: the rows ``over`` of ``x`` against every component.

    Parameters
    ----------
    out : (rows, comps, resp) Tensors of shape (len(over) * K,), int32, int32, float32, holding
        "no pair" (any row, component K, r 0): entry i's triples go to positions i * K .. i * K + K - 1
        where r >= ``min_resp``, and nothing else is written
    x : Tensor of shape (n, D), unit column stride
    over : int64 Tensor of shape (m,), rows of ``x``, then -1 (no row) as ``torch.nonzero_static`` pads
    centred : (means, precisions, consts), float32 (``exact_candidates.centred_params``)
    shift : float32 Tensor of shape (D,)
    min_resp : float, the least responsibility a triple has
    log_norm : float64 Tensor of shape (n,), each listed row's log Z written in place
    best : int32 Tensor of shape (n,), each listed row's best component written in place
    """
    means, precisions, consts = centred
    if not len(over):
        return
    block_d, one_tile = feature_tile(x.shape[1])
    overflow_rows_kernel[(len(over),)](
        x, x.stride(0), shift, means, precisions, consts, over, log_norm, best, *out, min_resp, len(consts),
        x.shape[1], DIAGONAL=precisions.dim() == 2, BLOCK_K=BLOCK_K, BLOCK_D=block_d, ONE_TILE=one_tile)


def overflow_pairs_reference(x, over, centred, shift, min_resp, log_norm, best):
    """``overflow_pairs_into`` by torch, returning the triples (shape (len(over) * K,) each, "no pair"
    where r < ``min_resp`` or the entry is -1)."""
    means, precisions, consts = centred
    n_comps = len(consts)
    live = over >= 0
    at = over.clamp_min(0)
    diff = (x[at].float() - shift)[:, None, :] - means
    sq = diff * diff
    quad = (sq * precisions).sum(2) if precisions.dim() == 2 else sq.sum(2) * precisions
    ll = consts - 0.5 * quad
    lz = torch.logsumexp(ll, 1)
    log_norm[over[live]] = lz[live].to(log_norm.dtype)
    best[over[live]] = ll.argmax(1)[live].to(best.dtype)
    r = torch.exp(ll - lz[:, None])
    take = live[:, None] & (r >= min_resp)
    comps = torch.arange(n_comps, dtype=torch.int32, device=x.device).expand_as(ll)
    rows = at.to(torch.int32)[:, None].expand_as(ll)
    return (torch.where(take, rows, 0).flatten(), torch.where(take, comps, n_comps).flatten(),
            torch.where(take, r, 0.0).flatten())
