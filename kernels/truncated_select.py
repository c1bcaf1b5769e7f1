"""Truncated E-step, selection pass: each row's best C' components of its search space.

One program owns BLOCK_N rows. For every row it forms the search space in registers (its C'
kept candidates and the G graph neighbours of each: BLOCK_M >= C'(G + 1) slots), gathers those
components' parameter rows, computes their log-densities in float32, keeps the best C'
distinct components (C' rounds of max; each round removes the chosen component from every
slot holding it, which is how repeated entries are handled: the torch path masks them
instead, with the same result) and normalises over the kept set. It writes per row the
truncated log Z, the kept components best first and their responsibilities: the statistics
are reduced from these (row, component, r) triples by ``kernels.truncated_stats``, so no
float atomics are needed.

Torch reference: ``kernels.truncated._select_torch``.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols):
    """(len(rows), len(cols)) tile of x minus the shift in float32, zero outside the matrix.

    The torch path's ``_centred`` in float32: the same rounding, so both paths see equal rows.
    """
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    return tl.where(mask, x.to(tl.float32) - shift[None, :], 0.0)


@triton.jit
def select_kernel(x_ptr, stride_x, shift_ptr, w_ptr, cand_ptr, graph_ptr, log_norm_ptr, members_ptr, resp_ptr,
                  n_rows, n_cols, n_params,
                  N_CAND: tl.constexpr, N_NEIGHBORS: tl.constexpr, DIAGONAL: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    slot = tl.arange(0, BLOCK_M)
    # Slot m < C' holds kept candidate m; slot C' + c G + g holds neighbour g of candidate c.
    own = slot < N_CAND
    in_space = slot < N_CAND * (N_NEIGHBORS + 1)
    if N_NEIGHBORS > 0:
        parent = tl.where(own, slot, (slot - N_CAND) // N_NEIGHBORS)
    else:
        parent = slot
    live = row_mask[:, None] & in_space[None, :]
    cand = tl.load(cand_ptr + rows[:, None].to(tl.int64) * N_CAND + parent[None, :], mask=live, other=0)
    comp = cand.to(tl.int64)
    if N_NEIGHBORS > 0:
        nb_mask = live & (slot[None, :] >= N_CAND)
        nb = tl.load(graph_ptr + comp * N_NEIGHBORS + ((slot - N_CAND) % N_NEIGHBORS)[None, :], mask=nb_mask,
                     other=0)
        comp = tl.where(nb_mask, nb.to(tl.int64), comp)
    # Parameter rows are [lin (D), quad (D, or 1 for spherical), const]: a component's
    # parameters are contiguous, so each gathered row is one coalesced read.
    w_rows = comp * n_params
    ll = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, n_cols, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = load_rows(x_ptr, stride_x, shift_ptr, rows, row_mask, cols, n_cols)
        w_offs = w_rows[:, :, None] + cols[None, None, :]
        w_mask = live[:, :, None] & (cols < n_cols)[None, None, :]
        term = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0) * x[:, None, :]
        if DIAGONAL:
            term += tl.load(w_ptr + w_offs + n_cols, mask=w_mask, other=0.0) * (x * x)[:, None, :]
        # A fresh sum per D tile joins the running total (as in the dense kernels): smaller
        # partial sums, less round-off at large D.
        ll += tl.sum(term, axis=2)
        sq_norm += tl.sum(x * x, axis=1)
    if not DIAGONAL:
        ll += sq_norm[:, None] * tl.load(w_ptr + w_rows + n_cols, mask=live, other=0.0)
    ll += tl.load(w_ptr + w_rows + n_params - 1, mask=live, other=0.0)
    ll = tl.where(live, ll, float("-inf"))

    # Best C' distinct components, best first. Fewer than C' distinct finite entries leave
    # -inf values (responsibility 0) whose component repeats the best slot's.
    col = tl.arange(0, BLOCK_C)
    kept = tl.full([BLOCK_N, BLOCK_C], float("-inf"), dtype=tl.float32)
    members = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int64)
    for i in tl.static_range(N_CAND):
        best = tl.max(ll, axis=1)
        at = tl.argmax(ll, axis=1)
        chosen = tl.sum(tl.where(slot[None, :] == at[:, None], comp, 0), axis=1)
        kept = tl.where(col[None, :] == i, best[:, None], kept)
        members = tl.where(col[None, :] == i, chosen[:, None], members)
        ll = tl.where(comp == chosen[:, None], float("-inf"), ll)
    # Rows past the end (never stored) get log Z = 0 rather than -inf - -inf.
    top = tl.where(row_mask, tl.max(kept, axis=1), 0.0)
    total = tl.where(row_mask, tl.sum(tl.exp(kept - top[:, None]), axis=1), 1.0)
    log_z = top + tl.log(total)
    out = rows[:, None].to(tl.int64) * N_CAND + col[None, :]
    out_mask = row_mask[:, None] & (col[None, :] < N_CAND)
    tl.store(log_norm_ptr + rows, log_z, mask=row_mask)
    tl.store(members_ptr + out, members.to(tl.int32), mask=out_mask)
    tl.store(resp_ptr + out, tl.exp(kept - log_z[:, None]), mask=out_mask)


def default_blocks(n_features: int, space: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D): the (rows, slots, features) tile holds at most 4096 values
    (32 a thread at 4 warps, so the gathered weights stay in registers); 32 features are one
    128-byte line of a component's parameter row."""
    block_m = triton.next_power_of_2(max(space, 1))
    block_d = min(32, triton.next_power_of_2(n_features))
    block_n = max(1, min(16, 4096 // (block_m * block_d)))
    return block_n, block_m, block_d


def select(x, shift, weights, candidates, graph, diagonal, *, num_warps=4):
    """Launch the selection pass.

    Parameters
    ----------
    x : Tensor of shape (n, D), float32/float16/bfloat16/uint8/int8, unit column stride
    shift : float32 Tensor of shape (D,)
    weights : float32 Tensor of shape (K, P), contiguous rows [lin, quad, const]
        (``kernels.truncated._weights``), P = 2D + 1 (diag) or D + 2 (spherical)
    candidates : int32 or int64 Tensor of shape (n, C'), contiguous, valid component indices
    graph : int32 or int64 Tensor of shape (K, G), contiguous
    diagonal : bool, the layout of ``weights``

    Returns
    -------
    log_norm : float32 Tensor of shape (n,), log sum over the kept components
    members : int32 Tensor of shape (n, C'), kept components best first
    resp : float32 Tensor of shape (n, C'), their responsibilities
    """
    n, d = x.shape
    c, g = candidates.shape[1], graph.shape[1]
    p = weights.shape[1]
    if p != (2 * d + 1 if diagonal else d + 2):
        raise ValueError(f"weights have {p} columns, which does not fit D = {d} and diagonal = {diagonal}")
    log_norm = torch.empty(n, dtype=torch.float32, device=x.device)
    members = torch.empty(n, c, dtype=torch.int32, device=x.device)
    resp = torch.empty(n, c, dtype=torch.float32, device=x.device)
    block_n, block_m, block_d = default_blocks(d, c * (g + 1))
    select_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), shift, weights, candidates, graph, log_norm, members, resp, n, d, p,
        N_CAND=c, N_NEIGHBORS=g, DIAGONAL=diagonal, BLOCK_N=block_n, BLOCK_M=block_m,
        BLOCK_C=triton.next_power_of_2(c), BLOCK_D=block_d, num_warps=num_warps)
    return log_norm, members, resp
