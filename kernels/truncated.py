"""Truncated variational E-step: every row keeps its C' best components, not all K.

Truncated EM (Lucke et al.; for GMMs at scale arXiv 2501.12299, code ``vamm``) replaces
the exact posterior of row n by one restricted to a small set K_n of C' components:

    q_n(k) = pi_k N(x_n | k) / sum_{j in K_n} pi_j N(x_n | j)        for k in K_n, else 0,

and the free energy F = sum_n log sum_{k in K_n} pi_k N(x_n | k) is a lower bound of the
log-likelihood. Each E-step ranks the search space S_n = K_n together with the G
nearest neighbours (in a component graph) of every member of K_n, and keeps the C'
best. Because the old K_n is part of S_n the new set's free energy is never below the
old one's, and the M-step on q raises F too: F never decreases (up to round-off).

Per row the cost is |S_n| <= C' (G + 1) dot products of length 2D + 1 instead of K,
so an E-step costs O(N C' G D), plus the graph: the G nearest means of every mean,
searched every ``REBUILD_EVERY`` passes, on a CPU with FAISS (exactly up to 4096
components, by an inverted file over the means beyond: O(K^1.5 D)), on a GPU by K x K
products (``exact_graph``: ranked in float16, the finalists re-ranked in float32), and
refined in between from the previous graph by one round of neighbour descent
(``refine_graph``: O(K G^2 D)). The log-densities of S_n are one sampled matrix product
(``torch.sparse.sampled_addmm``: only the (row, component) pairs of S_n, no gathered
(n, |S_n|, D) copy of the parameters) and the statistics one sparse times dense
product, so the CPU path runs at library speed with no Python loop over rows or
components. On CUDA (float32) the same E-step runs as two Triton kernels: a selection
pass (``truncated_select``: gather, log-densities, top C' in registers) and a
deterministic statistics pass (``truncated_stats``: segment sums over the kept
(row, component, r) triples sorted by component); the torch code is their oracle.

``estep`` is the pure function of one block; ``TruncatedEStep`` holds what persists
across EM iterations: the (N, C') candidate sets, keyed by global row index so a
streamed data set works (held on the GPU in a CUDA fit), and the nearest-mean search
the graph comes from.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import warnings

import faiss
import numpy as np
import torch

from .params import NaturalParams, split_offset
from .reference import design, design_weights
from .result import EStepResult
from .truncated_select import select
from .truncated_stats import segment_stats

# Up to this many components the nearest means are found exactly (IndexFlatL2);
# beyond, by an inverted file over the means, so that neither the graph (K x K) nor
# the first pass's candidate search (N x K) costs in proportion to K.
EXACT_SEARCH_MAX = 4096
# Measured on 65,536 k-means means of SIFT: nprobe 4 finds 85% of the 12 true nearest
# (8: 94%) in 60% of the time; the graph only proposes candidates, ranking decides.
IVF_NPROBE = 4
# The graph is searched from scratch every this many passes and refined from the previous
# one in between (``refine_graph``). Measured on SIFT (12 neighbours, 12 EM passes from an
# exact graph): refined graphs keep 96-98% of the exact nearest at K = 65,536 and 93-96% at
# 16,384 (the inverted file finds 89%); on an H100 a refinement takes 3.5 ms at K = 65,536
# against 43 ms for an exact search; held-out log-likelihood unchanged (+-0.01%).
REBUILD_EVERY = 8
# nearest_means with a float16 shortlist re-ranks this many times k finalists in float32.
SHORTLIST = 4
# Rows per sub-block: the search space is a (rows, C'(G+1)) int64 array.
SUB_BLOCK_ROWS = 16384
# Candidate sets above this size live in an unlinked temporary file (np.memmap).
IN_MEMORY_BYTES = 1 << 30


@contextlib.contextmanager
def _sparse_beta():
    """Silence torch's notices that sparse CSR support is in beta and that invariant checks are
    off (the ops used here are tested; the patterns are built valid)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _sort_rows(a: torch.Tensor) -> torch.Tensor:
    """Each row of ``a`` ascending. On the host in place through numpy, whose AVX-512 sort is
    ~20x faster than torch's on (16,384, 104) int64 rows (2 ms against 46 ms)."""
    if _on_host(a):
        a.numpy().sort(1)
        return a
    return a.sort(1).values


def _true_places(mask: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions of the True entries of ``mask``.

    On the host through np.flatnonzero: gathering and scattering at these positions takes
    ~2 ms on (16,384, 104) search spaces, where numpy's boolean indexing takes ~15 ms on
    their irregular masks (a branch per element) and torch's is slower still.
    """
    if _on_host(mask):
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.flatten()).flatten()


def _compress(a: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """The entries of ``a`` at flat ``places`` (``a[mask]`` for ``places = _true_places(mask)``)."""
    if _on_host(a):
        return torch.from_numpy(a.numpy().ravel().take(places.numpy()))
    return a.flatten()[places]


def _expand(shape, places: torch.Tensor, values: torch.Tensor, fill: float) -> torch.Tensor:
    """A tensor of ``shape``: ``values`` at flat ``places``, ``fill`` elsewhere."""
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    if _on_host(out):
        out.numpy().ravel()[places.numpy()] = values.numpy()
    else:
        out.view(-1)[places] = values
    return out


def _top(ll: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices of each row's k largest entries, largest first.

    On the host through numpy: the k-th largest value of each row by a partition of the
    values alone (np.partition: 3 ms on (16,384, 104), where np.argpartition takes 11 ms and
    torch.topk 20 ms) and the entries at or above it; rows where ties make those more than k
    go through np.argpartition. Which of several tied entries is kept may differ from torch.topk.
    """
    if not _on_host(ll):
        return torch.topk(ll, k, dim=1)
    a = ll.numpy()
    n, m = a.shape
    keep = a >= np.partition(a, m - k, axis=1)[:, m - k, None]
    tied = np.flatnonzero(np.count_nonzero(keep, 1) != k)
    if tied.size:  # rows where several entries equal the k-th largest value
        rows = np.zeros((tied.size, m), dtype=bool)
        np.put_along_axis(rows, np.argpartition(a[tied], m - k, axis=1)[:, m - k:], True, 1)
        keep[tied] = rows
    where = (np.flatnonzero(keep) % m).reshape(n, k)
    top = np.take_along_axis(a, where, 1)
    order = np.argsort(-top, axis=1, kind="stable")
    return (torch.from_numpy(np.take_along_axis(top, order, 1)),
            torch.from_numpy(np.take_along_axis(where, order, 1)))


def search_space(candidates: torch.Tensor, graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates and their graph neighbours, sorted per row, with a mask of first occurrences.

    Parameters
    ----------
    candidates : Tensor of shape (n, C'), int64
    graph : Tensor of shape (K, G), int64

    Returns
    -------
    space : Tensor of shape (n, C' (G + 1)), int64, each row ascending
    fresh : bool Tensor of the same shape, False on repeats of the entry before
    """
    # One gather: every candidate's row of [itself, its G neighbours].
    own = torch.arange(graph.shape[0], dtype=graph.dtype, device=graph.device)[:, None]
    space = _sort_rows(torch.cat([own, graph], 1)[candidates].flatten(1))
    fresh = torch.ones_like(space, dtype=torch.bool)
    fresh[:, 1:] = space[:, 1:] != space[:, :-1]
    return space, fresh


def candidate_log_prob(z: torch.Tensor, weights: torch.Tensor, space: torch.Tensor,
                       fresh: torch.Tensor) -> torch.Tensor:
    """log pi_k + log N(x_n | k) for k in the search space; ``-inf`` on repeated entries.

    Parameters
    ----------
    z : Tensor of shape (n, P), ``_design`` of the rows
    weights : Tensor of shape (K, P), ``_weights`` of the mixture, dtype of z
    space, fresh : from ``search_space``, shape (n, M)

    Returns
    -------
    Tensor of shape (n, M), dtype of z
    """
    counts = torch.from_numpy(np.count_nonzero(fresh.numpy(), 1)) if _on_host(fresh) else fresh.sum(1)
    crow = torch.zeros(space.shape[0] + 1, dtype=torch.int64, device=space.device)
    torch.cumsum(counts, 0, out=crow[1:])
    places = _true_places(fresh)
    cols = _compress(space, places)
    with _sparse_beta():
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(cols, dtype=z.dtype),
                                          size=(space.shape[0], weights.shape[0]), check_invariants=False)
        sampled = torch.sparse.sampled_addmm(pattern, z, weights.T, beta=0.0)
    # The CSR values are laid out row-major, in the order of the places.
    return _expand(fresh.shape, places, sampled.values(), -math.inf)


def _add_stats(acc: torch.Tensor, resp: torch.Tensor, members: torch.Tensor, z: torch.Tensor) -> None:
    """acc[k] += sum_n r_nk z_n over the components the rows hold (acc in the dtype of z).

    A (U, n) sparse matrix times the (n, P) design, U the distinct members: the work is
    O(n C' P), not O(K P) per call, which matters when K is large and blocks are small.
    """
    n, c = members.shape
    held, slot = torch.unique(members, return_inverse=True)
    rows = torch.arange(n, device=z.device).repeat_interleave(c)
    r = torch.sparse_coo_tensor(torch.stack([slot.flatten(), rows]), resp.flatten(), (held.numel(), n),
                                check_invariants=False)
    acc.index_add_(0, held, torch.sparse.mm(r, z))


def _select_torch(z, weights, candidates, graph, n_keep):
    """Best ``n_keep`` components of each row's search space (torch; ``truncated_select`` on a GPU).

    Parameters
    ----------
    z : Tensor of shape (n, P), ``_design`` of the rows
    weights : Tensor of shape (K, P), ``_weights`` of the mixture, dtype of z
    candidates : int64 Tensor of shape (n, C')
    graph : int64 Tensor of shape (K, G)
    n_keep : int, C'

    Returns
    -------
    log_norm : Tensor of shape (n,), log sum over the kept components
    members : int64 Tensor of shape (n, C'), kept components best first
    resp : Tensor of shape (n, C'), their responsibilities
    """
    space, fresh = search_space(candidates, graph)
    ll = candidate_log_prob(z, weights, space, fresh)
    # Ranking includes the old candidates, so the kept set's free energy is >= theirs.
    top, where = _top(ll, n_keep)
    lz = torch.logsumexp(top, 1)
    return lz, space.gather(1, where), torch.exp(top - lz[:, None])


def _estep_torch(x, params, shift, candidates, graph, dtype, chunk_size):
    n, d = x.shape
    c = candidates.shape[1]
    weights = design_weights(params, dtype).to(x.device)
    graph = graph.to(device=x.device, dtype=torch.int64)
    f64 = dict(dtype=torch.float64, device=x.device)
    log_norm = torch.empty(n, **f64)
    new = torch.empty(n, c, dtype=torch.int64, device=x.device)
    # Sub-block sums are added in the arithmetic's dtype (as the dense kernels' partials are)
    # and widened once: widening each (U, P) partial cost 10% of an iteration at K = 65,536.
    acc = torch.zeros(weights.shape[0], weights.shape[1], dtype=dtype, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        z = design(x[start:stop], shift, params.diagonal, dtype)
        cand = candidates[start:stop].to(device=x.device, dtype=torch.int64)
        log_norm[start:stop], new[start:stop], resp = _select_torch(z, weights, cand, graph, c)
        _add_stats(acc, resp, new[start:stop], z)
    acc = acc.double()
    s2 = acc[:, d:2 * d] if params.diagonal else acc[:, d]
    return EStepResult(log_norm, acc[:, -1].clone(), acc[:, :d].clone(), s2.clone()), new


def _estep_triton(x, params, shift, candidates, graph):
    n, d = x.shape
    k = params.lin.shape[0]
    if n == 0:
        f64 = dict(dtype=torch.float64, device=x.device)
        return (EStepResult(torch.empty(0, **f64), torch.zeros(k, **f64), torch.zeros(k, d, **f64),
                            torch.zeros((k, d) if params.diagonal else (k,), **f64)),
                torch.empty(0, candidates.shape[1], dtype=torch.int64, device=x.device))
    if x.stride(1) != 1:
        x = x.contiguous()
    shift = (torch.zeros(d, dtype=torch.float32, device=x.device) if shift is None
             else shift.to(device=x.device, dtype=torch.float32).contiguous())
    weights = design_weights(params, torch.float32).to(x.device).contiguous()
    candidates = candidates.to(x.device).contiguous()
    graph = graph.to(x.device).contiguous()
    lz, members, resp = select(x, shift, weights, candidates, graph, params.diagonal)
    nk, s1, s2 = segment_stats(x, shift, members, resp, k, params.diagonal)
    return EStepResult(lz.double(), nk, s1, s2), members.long()


def _backend(backend, x: torch.Tensor, dtype) -> str:
    """``backend`` checked, or resolved when None: the Triton kernels for float32 on CUDA."""
    if backend is None:
        return "triton" if x.is_cuda and dtype == torch.float32 else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch', 'triton' or None, got {backend!r}")
    return backend


def estep(x, params: NaturalParams, shift, candidates, graph, *, dtype=torch.float64,
          chunk_size=SUB_BLOCK_ROWS, backend=None) -> tuple[EStepResult, torch.Tensor]:
    """Truncated E-step of one block: statistics over each row's best C' of its search space.

    Parameters
    ----------
    x : Tensor of shape (n, D), any real dtype
    params : NaturalParams (diag or spherical), relative to ``shift``
    shift : Tensor of shape (D,) or None
    candidates : Tensor of shape (n, C'), integer, valid component indices (repeats allowed)
    graph : Tensor of shape (K, G), integer, neighbours of every component (G may be 0)
    dtype : arithmetic precision of the log-densities and products (the Triton path is float32)
    chunk_size : rows per sub-block of the torch path
    backend : {'torch', 'triton'} or None
        None: the Triton kernels (``truncated_select``, ``truncated_stats``) for float32 on
        CUDA, torch otherwise. 'triton' on CPU tensors needs ``TRITON_INTERPRET=1``.

    Returns
    -------
    EStepResult, all float64, where ``log_norm`` is the truncated log Z_n (a lower bound
    of log p(x_n)) and the statistics use the truncated responsibilities.
    new_candidates : Tensor of shape (n, C'), int64, best first
    """
    params, offset = split_offset(params)
    if _backend(backend, x, dtype) == "triton":
        result, new = _estep_triton(x, params, shift, candidates, graph)
    else:
        result, new = _estep_torch(x, params, shift, candidates, graph, dtype, chunk_size)
    return result._replace(log_norm=result.log_norm + offset), new


class MeanIndex:
    """Nearest component means by L2: exact up to ``EXACT_SEARCH_MAX`` components, else an
    inverted file whose coarse cells are trained on the first means given and kept (means
    move little between EM iterations; the cells only steer the search).

    Parameters
    ----------
    n_features : int
    n_components : int
    """

    def __init__(self, n_features: int, n_components: int):
        self.exact = faiss.IndexFlatL2(n_features)
        self.index = self.exact
        if n_components > EXACT_SEARCH_MAX:
            nlist = int(math.sqrt(n_components))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(n_features), n_features, nlist)
            self.index.nprobe = IVF_NPROBE

    def update(self, means: np.ndarray) -> None:
        """Index ``means`` (K, D) float32, replacing the previous ones."""
        if not self.index.is_trained:
            self.index.train(means)
        # The exact index also serves rows the inverted file finds nothing for.
        for index in [self.exact] if self.index is self.exact else [self.exact, self.index]:
            index.reset()
            index.add(means)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(n, k) int64 indices of the nearest means, nearest first; never -1.

        An inverted file may find fewer than k means in the cells it probes: the gaps
        repeat the nearest one found (repeats are harmless to the E-step), and a row
        that finds none is searched exactly.
        """
        _, found = self.index.search(queries, k)
        lost = found[:, 0] < 0
        if lost.any():
            found[lost] = self.exact.search(queries[lost], k)[1]
        return np.where(found < 0, found[:, :1], found)

    def cells(self, means: np.ndarray) -> np.ndarray | None:
        """(K,) coarse cell of every mean (inverted file), or None (exact search)."""
        if self.index is self.exact:
            return None
        return self.index.quantizer.assign(means, 1)[:, 0]

    def graph(self, means: np.ndarray, n_neighbors: int) -> np.ndarray:
        """(K, G) int64: the G nearest other means of every mean (itself where too few are found)."""
        k = means.shape[0]
        if n_neighbors == 0:
            return np.empty((k, 0), dtype=np.int64)
        _, found = self.index.search(means, n_neighbors + 1)
        own = np.arange(k)[:, None]
        found[found == own] = -1
        # Move the gaps (itself, or nothing found) to the end, keep distance order, cut to G.
        found = np.take_along_axis(found, np.argsort(found < 0, axis=1, kind="stable"), 1)[:, :n_neighbors]
        return np.where(found < 0, own, found)


def nearest_means(queries: torch.Tensor, means: torch.Tensor, k: int, shortlist: bool | None = None) -> torch.Tensor:
    """(n, k) int64 indices of the k nearest means by L2, nearest first (any device).

    Distances |q - m|^2 - |q|^2 = |m|^2 - 2 q.m in float32 on rows and means centred on the
    means' centroid (raw-scale data would lose digits to |m|^2 otherwise), a block of
    queries at a time so that the (rows, K) distances stay near 256 MB.

    With ``shortlist`` (default: on CUDA, where the full float32 pass is bound by the float32
    product and by top-k over the (rows, K) block: 0.1 s per graph at K = 65,536 on an
    H100) the K distances are first ranked in float16 on rows and means scaled to unit
    norm (tensor cores, half the bytes for top-k); the ``SHORTLIST`` x k best are then
    re-ranked in float32. float16's ~1e-3 relative error cannot push a true k-th nearest
    behind that many others unless distances tie to that precision.
    """
    means = means.float()
    centre = means.mean(0)
    m = means - centre
    sq = (m * m).sum(1)
    shortlist = means.is_cuda if shortlist is None else shortlist
    finalists = min(means.shape[0], SHORTLIST * k)
    shortlist = shortlist and finalists < means.shape[0]
    if shortlist:
        # A power of two: the scaling itself is exact.
        scale = 2.0 ** math.ceil(math.log2(max(float(sq.max()), 1e-30)) / 2)
        m16, sq16 = (m / scale).half(), (sq / scale ** 2).half()
    step = max(1, (1 << 26) // means.shape[0])
    out = torch.empty(queries.shape[0], k, dtype=torch.int64, device=means.device)
    for start in range(0, queries.shape[0], step):
        q = queries[start:start + step].to(device=means.device, dtype=torch.float32) - centre
        if not shortlist:
            out[start:start + step] = torch.addmm(sq, q, m.T, alpha=-2.0).topk(k, 1, largest=False).indices
            continue
        rough = torch.addmm(sq16, (q / scale).half(), m16.T, alpha=-2.0)
        short = _smallest_columns(rough, finalists)
        exact = sq[short] - 2 * torch.einsum("nd,nsd->ns", q, m[short])
        out[start:start + step] = short.gather(1, exact.topk(k, 1, largest=False).indices)
    return out


def _smallest_columns(scores: torch.Tensor, count: int, group: int = 128) -> torch.Tensor:
    """(n, count) column indices of each row's ``count`` smallest scores (ties in any order).

    Long rows go in two stages: the ``count`` groups of ``group`` columns with the smallest
    minima hold all ``count`` smallest entries (an entry among them lies in a group whose
    minimum is at most the count-th smallest value, and at most ``count`` groups have such a
    minimum), so top-k runs over those groups only: a tenth of the row at K = 65,536.
    """
    n, k = scores.shape
    groups = k // group
    if k % group or groups <= 2 * count:
        return scores.topk(count, 1, largest=False).indices
    tiles = scores.view(n, groups, group)
    best = tiles.amin(2).topk(count, 1, largest=False).indices
    held = tiles.gather(1, best[:, :, None].expand(n, count, group)).flatten(1)
    at = held.topk(count, 1, largest=False).indices
    return best.gather(1, at // group) * group + at % group


def exact_graph(means: torch.Tensor, n_neighbors: int, shortlist: bool | None = None) -> torch.Tensor:
    """(K, G) int64: the G nearest other means of every mean (``nearest_means``)."""
    k = means.shape[0]
    if n_neighbors == 0:
        return torch.empty(k, 0, dtype=torch.int64, device=means.device)
    return _others(nearest_means(means, means, n_neighbors + 1, shortlist), torch.arange(k, device=means.device))


def _others(found: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Rows of ``found`` (nearest first, one more than wanted) without the mean ``own[i]`` itself:
    its index moves last, the others keep their distance order, the last column is cut."""
    is_own = found == own[:, None]
    return found.gather(1, torch.argsort(is_own.to(torch.uint8), dim=1, stable=True))[:, :-1]


def refine_graph(means: torch.Tensor, graph: torch.Tensor, *, backend=None) -> torch.Tensor:
    """(K, G) int64: the G nearest means of every mean among its neighbours in ``graph`` and theirs.

    One round of neighbour descent (Dong, Charikar and Li, "Efficient k-nearest neighbor graph
    construction", WWW 2011): means move little between EM iterations, so the new nearest
    means of a mean are nearly all among the old graph's neighbours and neighbours of
    neighbours. It costs K (G + 1)^2 distances, against K^2 for an exact rebuild.

    The distances come from the E-step's own selection (``truncated_select`` on CUDA, its torch
    reference elsewhere): to a spherical "mixture" with rows [2 m_j, 0, -|m_j|^2] a mean m_i has
    log-density 2 m_i.m_j - |m_j|^2 = |m_i|^2 - |m_i - m_j|^2, so the best C' = G + 1 of
    the search space {i} + graph[i] + graph[graph[i]] are i and its G nearest found.

    Parameters
    ----------
    means : Tensor of shape (K, D)
    graph : int64 Tensor of shape (K, G), the previous graph, on the device of ``means``
    backend : {'torch', 'triton'} or None, as in ``estep``
    """
    k, g = graph.shape
    if g == 0:
        return graph
    m = means.float()
    m = m - m.mean(0)  # raw-scale means would lose digits to |m_j|^2 otherwise
    sq = (m * m).sum(1, keepdim=True)
    weights = torch.cat([2 * m, torch.zeros_like(sq), -sq], 1)
    own = torch.arange(k, device=m.device)
    start = torch.cat([own[:, None], graph], 1)
    if _backend(backend, m, m.dtype) == "triton":
        _, found, _ = select(m, torch.zeros(m.shape[1], dtype=torch.float32, device=m.device), weights,
                             start.contiguous(), graph.contiguous(), diagonal=False)
        found = found.long()
    else:
        found = torch.cat([_select_torch(design(m[i:i + SUB_BLOCK_ROWS], None, False, m.dtype), weights,
                                         start[i:i + SUB_BLOCK_ROWS], graph, g + 1)[1]
                           for i in range(0, k, SUB_BLOCK_ROWS)])
    return _others(found, own)


class TruncatedEStep:
    """What a truncated E-step keeps across EM iterations of one fit.

    Two ways to find nearest means (the graph, and the starting candidates of new rows):
    FAISS on the host (``MeanIndex``: exact up to ``EXACT_SEARCH_MAX`` components, an
    inverted file beyond), or exact torch products on the means' device
    (``nearest_means``, ``exact_graph``); the second is the one for a GPU, where the
    K x K products run on tensor cores and nothing crosses to the host.

    Parameters
    ----------
    n_samples : int
        Rows of the data set; candidate sets are indexed by global row number.
    n_components : int
    n_features : int
    n_candidates : int
        C', clipped to K.
    n_neighbors : int
        G, clipped to K - 1.
    search : {'auto', 'faiss', 'torch'}
        'auto': torch when the means given to ``begin_pass`` are on CUDA, else FAISS.

    Attributes
    ----------
    candidates : ndarray, np.memmap or Tensor of shape (n_samples, C'), int32
        Each row's components, best first; -1 until the row's first E-step. Above
        ``IN_MEMORY_BYTES`` it is a memmap of an unlinked temporary file; otherwise,
        once a block arrives on CUDA, a tensor on that device.
    graph : Tensor of shape (K, G), int64, on the device of the means
        Neighbours of every component, rebuilt from the means by ``begin_pass``.
    worst_rows : Tensor of shape (m,), int64
        Global indices of the worst-explained rows of the last pass, worst first
        (set by the estimator; a re-seeded component is planted on them).
    """

    def __init__(self, n_samples: int, n_components: int, n_features: int, n_candidates: int, n_neighbors: int,
                 search: str = "auto"):
        if search not in ("auto", "faiss", "torch"):
            raise ValueError(f"search must be 'auto', 'faiss' or 'torch', got {search!r}")
        self.n_components = n_components
        self.n_candidates = min(n_candidates, n_components)
        self.n_neighbors = min(n_neighbors, n_components - 1)
        shape = (n_samples, self.n_candidates)
        if n_samples * self.n_candidates * 4 > IN_MEMORY_BYTES:
            self._file = tempfile.TemporaryFile(prefix="flashgmm-candidates-")
            self.candidates = np.memmap(self._file, dtype=np.int32, mode="w+", shape=shape)
        else:
            self.candidates = np.empty(shape, dtype=np.int32)
        self.candidates.fill(-1)
        self.search = search
        self.index = MeanIndex(n_features, n_components)
        self.graph = None
        self.worst_rows = torch.empty(0, dtype=torch.int64)
        self._means = None  # float32 means on their device (torch search)
        self._host_means, self._indexed = None, False  # this pass's means, FAISS search
        self._cells = None  # coarse cell of every mean at the last rebuild (FAISS inverted file)
        self._passes = 0
        self._planted = torch.empty(0, dtype=torch.int64)  # components re-seeded since the last pass

    def begin_pass(self, means: torch.Tensor) -> None:
        """Rebuild the graph from the current means (K, D) (absolute coordinates).

        From scratch on the first pass and every ``REBUILD_EVERY`` passes (exact search, or
        the inverted file beyond ``EXACT_SEARCH_MAX`` on the host); in between refined from
        the previous graph (``refine_graph``), with the rows of components re-seeded since
        (``plant``) searched exactly: they jumped.
        """
        means = means.detach()
        refine = self.graph is not None and self._passes % REBUILD_EVERY != 0
        self._passes += 1
        if self.search == "torch" or (self.search == "auto" and means.is_cuda):
            self._means = m = means.float()
            self.graph = refine_graph(m, self.graph) if refine else exact_graph(m, self.n_neighbors)
        else:
            m = torch.from_numpy(np.ascontiguousarray(means.cpu().numpy(), dtype=np.float32))
            # The host index is brought up to date only when a search needs it: refined
            # passes do not (``_nearest`` catches up).
            self._host_means, self._indexed = m.numpy(), False
            if refine:
                self.graph = refine_graph(m, self.graph)
            else:
                self._update_index()
                self.graph = torch.from_numpy(self.index.graph(self._host_means, self.n_neighbors))
                cells = self.index.cells(self._host_means)
                self._cells = None if cells is None else torch.from_numpy(cells)
        if refine and self._planted.numel() and self.n_neighbors:
            rows = self._planted.to(m.device)
            self.graph[rows] = _others(nearest_means(m[rows], m, self.n_neighbors + 1), rows)
        self._planted = self._planted[:0]

    def _update_index(self) -> None:
        """Index the host means of this pass, unless done already."""
        if not self._indexed:
            self.index.update(self._host_means)
            self._indexed = True

    def _store(self, device) -> torch.Tensor:
        """The candidate sets as a tensor: on a CUDA ``device`` when they are held in memory
        (moved there at the first such block), else a view of the host array."""
        if device.type == "cuda" and not torch.is_tensor(self.candidates) \
                and not isinstance(self.candidates, np.memmap):
            self.candidates = torch.from_numpy(self.candidates).to(device)
        return self.candidates if torch.is_tensor(self.candidates) else torch.from_numpy(self.candidates)

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C') int64 nearest means of the rows x, on x's device."""
        if self._means is not None:
            return nearest_means(x, self._means, self.n_candidates).to(x.device)
        self._update_index()
        found = self.index.search(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32), self.n_candidates)
        return torch.from_numpy(found).to(x.device)

    def _order(self, cand: torch.Tensor) -> torch.Tensor | None:
        """Row order of a block for large K, None for small K.

        Large K: the (K, 2D+1) parameters outgrow the cache. Rows taken in the order of
        their best candidate's coarse cell (FAISS), or of the best candidate itself (torch
        search, on a GPU), read nearby or equal components one after another.
        """
        if self.n_components <= EXACT_SEARCH_MAX:
            return None
        best = cand[:, 0]
        return torch.argsort(best if self._cells is None else self._cells.to(best.device)[best], stable=True)

    def block(self, offset: int, x: torch.Tensor, params: NaturalParams, shift: torch.Tensor,
              dtype=torch.float32) -> EStepResult:
        """E-step of rows ``offset .. offset + len(x)``; updates their candidate sets.

        Rows seen for the first time start from their C' nearest means (L2).
        """
        if self.graph is None:
            raise RuntimeError("begin_pass(means) must come before the first block of a pass")
        if offset is None:
            raise ValueError("the truncated E-step needs each block's global row offset")
        store = self._store(x.device)
        rows = torch.arange(offset, offset + x.shape[0], device=store.device)
        cand = store[rows].to(device=x.device, dtype=torch.int64)
        unseen = cand[:, 0] < 0
        if bool(unseen.any()):
            cand[unseen] = self._nearest(x[unseen])
        order = self._order(cand)
        if order is None:
            result, new = estep(x, params, shift, cand, self.graph, dtype=dtype)
        else:
            result, new = estep(x[order], params, shift, cand[order], self.graph, dtype=dtype)
            rows = rows[order.to(store.device)]
            log_norm = torch.empty_like(result.log_norm)
            log_norm[order] = result.log_norm
            result = result._replace(log_norm=log_norm)
        store[rows] = new.to(device=store.device, dtype=torch.int32)
        return result

    def plant(self, components: torch.Tensor) -> None:
        """Make re-seeded ``components`` candidates of the rows they were seeded on.

        The i-th component goes to ``worst_rows[i]`` (the M-step seeds in that order),
        replacing the row's weakest candidate.
        """
        store = self._store(self.worst_rows.device)
        rows = self.worst_rows[: components.numel()].to(store.device)
        store[rows, -1] = components.to(device=store.device, dtype=torch.int32)
        # They jumped: the next refined graph searches their rows afresh.
        self._planted = torch.cat([self._planted, components.detach().cpu().long()])
