"""Exact-on-candidates E-step (``kernels.candidates``, ``kernels.candidates_wide``, ``exact_log_prob``,
``candidate_resp``, ``kept_pairs``, ``exact_candidates``)
against the float64 dense E-step (``kept_pairs`` against torch indexing).

Without a GPU the kernels run in Triton's interpreter (see conftest). Shapes are not multiples
of any block; rows are raw-scale (0..255) or standardised; posteriors range from peaked to
flat (every component a candidate), and rows that overflow the capacity take the dense path.
Outputs are poisoned (NaN / -7) before the kernels write them.
"""
import importlib
import math
import warnings

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from flashgmm_ivf.kernels import exact_candidates, gemm
from flashgmm_ivf.kernels import params as kparams
from flashgmm_ivf.kernels.candidate_resp import candidate_resp
from flashgmm_ivf.kernels.candidate_weights import candidate_weights, candidate_weights_reference
from flashgmm_ivf.kernels.candidates import (BOUND_COLUMNS, bf16_values, bound_rows_reference, candidates,
                                              search_weights)
from flashgmm_ivf.kernels.candidates_wide import candidates_wide
from flashgmm_ivf.kernels.estep import candidate_search
from flashgmm_ivf.kernels.exact_log_prob import exact_log_probs
from flashgmm_ivf.kernels.kept_pairs import kept_pairs, kept_pairs_into, kept_pairs_reference
from flashgmm_ivf.kernels.overflow_rows import overflow_pairs_into, overflow_pairs_reference
from flashgmm_ivf.kernels.reference import weighted_log_prob
from flashgmm_ivf.kernels.tile import round_bf16_directed
from test_kernels import make_rows, random_mixture, relative_error

from flashgmm_ivf import GaussianMixture, kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (n rows, D features, K components, candidate-pass tiles (BLOCK_N, BLOCK_K, BLOCK_D))
SHAPES = [
    (1, 1, 1, (16, 32, 16)),
    (37, 5, 3, (16, 32, 16)),        # K below one tile
    (203, 37, 19, (32, 32, 64)),     # D in one tile
    (61, 70, 50, (16, 32, 32)),      # K over two tiles (two words of marks), D over three tiles
    (19, 128, 7, (16, 32, 128)),     # D fills the exact log-densities' register tile
    (45, 129, 11, (16, 32, 128)),    # D just over one tile
    (71, 20, 70, (16, 64, 32)),      # K over two tiles of two words each, the last word partly used
]
# Float32 from centred differences: measured ~1e-6 relative against float64.
TOLERANCE = 2e-5


def config(blocks):
    return kernels.LaunchConfig(*blocks, num_warps=4, num_stages=1, rows_first=True)


def prepared(x, params, shift):
    split, offset = kparams.split_offset(params.to(dtype=torch.float32))
    weights = kparams.kernel_weights(split, "bf16", DEVICE)
    return x.to(DEVICE), split.to(DEVICE), shift.to(device=DEVICE, dtype=torch.float32), weights, offset


def search(how, xd, sh, split, blocks):
    """The search as ``exact_candidates.estep`` takes it, for the split parameters ``split``:
    ``candidate_search`` with the given tiles (the fused pass where D fits one tile, else the wide
    one; ranked by the fused pass 1), or "wide": ranked by library products (``gemm.log_norm``, the
    ranking of wide rows on a GPU) and marked by the wide pass, both in blocks of 16 rows (several
    blocks, the last one short, at every shape over 16 rows) and the wide pass in 32-wide feature
    tiles."""
    weights, search_w = kparams.kernel_weights(split, "bf16", DEVICE), search_weights(split, DEVICE)
    if how == "fused":
        return candidate_search(xd, sh, weights, search_w, (config(blocks), None))
    wide = config((blocks[0], blocks[1], 32))

    def by_blocks(rows, centred, margin, hint):
        top = gemm.log_norm(rows, sh, weights, precision="bf16", rows=16)[1] if hint is None else hint
        return candidates_wide(rows, sh, search_w, centred, top, margin, wide, rows=16)
    return by_blocks


def mixture(n, d, k, kind, diagonal, flat=False, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + 10 * d + k)
    x = make_rows(n, d, kind, gen)
    params, shift = random_mixture(x, k, diagonal, gen)
    if flat:  # every component the same Gaussian: all K are within 0 nats of the best
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        var = torch.full((k, d) if diagonal else (k,), float(x.double().var()), dtype=torch.float64)
        # statistics about the origin (no shift), so that S1 is not the zero sum around the mean
        means = x.double().mean(0).expand(k, d)
        params, shift = kernels.natural_params(w, means, var), torch.zeros(d, dtype=torch.float64)
    return x, params, shift


@pytest.mark.parametrize("n,d,k,blocks", SHAPES)
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("kind", ["raw", "standardised"])
@pytest.mark.parametrize("how", ["fused", "wide"])
def test_candidates_hold_every_component_within_the_margin(n, d, k, blocks, diagonal, kind, how, poisoned_empty):
    x, params, shift = mixture(n, d, k, kind, diagonal)
    xd, split, sh, weights, _ = prepared(x, params, shift)
    margin, capacity = 5.0, 8
    centred = exact_candidates.centred_params(split)
    marks = search(how, xd, sh, split, blocks)(xd, centred, margin, None)
    assert marks.shape == (n, -(-k // 32)) and marks.dtype == torch.int32
    _, resp, top, cand, count, kept = candidate_resp(xd, sh, *centred, marks, capacity)
    cand, count, resp, top, kept = cand.cpu(), count.cpu(), resp.cpu(), top.cpu().long(), kept.cpu()
    # With a least responsibility, each row keeps those of its slots that reach it, packed in order;
    # a given ``best`` is written in place where the row does not overflow.
    floor, given = 1e-3, torch.full((n,), -7, dtype=torch.int32, device=DEVICE)
    _, packed_resp, _, packed, _, n_packed = (t.cpu() for t in candidate_resp(xd, sh, *centred, marks, capacity,
                                                                               min_resp=floor, best=given))
    assert torch.equal(given.cpu().long(), torch.where(count <= capacity, top, -7))
    bits = (marks.cpu().long()[:, :, None] >> torch.arange(32)) & 1
    marked = [torch.nonzero(row.flatten()).view(-1) for row in bits]
    exact = weighted_log_prob(x.double(), split.to(dtype=torch.float64).to("cpu"), shift.float().double())
    best = exact.amax(1)
    for row in range(n):
        assert (marked[row] < k).all() and count[row] == len(marked[row])
        assert kept[row] == (count[row] if count[row] <= capacity else 0)
        assert count[row] >= 1  # the first-ranked component reaches its own threshold
        needed = torch.nonzero(exact[row] >= best[row] - margin).view(-1)
        assert set(needed.tolist()) <= set(marked[row].tolist()), row
        if count[row] <= capacity:
            stored = cand[row, :int(count[row])].long()
            assert torch.equal(stored, marked[row])  # every mark in a slot, in component order
            # the exact pass weighs them, and its responsibilities sum to 1
            weighted = stored[resp[row, :len(stored)] > 0]
            assert set(needed.tolist()) <= set(weighted.tolist()), row
            assert abs(float(resp[row, :len(stored)].double().sum()) - 1) < 1e-5
            assert exact[row, top[row]] >= best[row] - 1e-3  # the best, or a float32 tie with it
            reach = resp[row, :len(stored)] >= floor
            assert n_packed[row] == reach.sum() >= 1
            assert torch.equal(packed[row, :n_packed[row]].long(), stored[reach])
            assert torch.equal(packed_resp[row, :n_packed[row]], resp[row, :len(stored)][reach])
        else:
            assert n_packed[row] == 0


def bound_rule(x, shift, split):
    """The candidate pass's upper bound replayed in float64 from its operands
    (``candidates.search_weights`` of the split parameters): (U, the products' sizes sum |a~| |b~|)."""
    w = search_weights(split, "cpu")
    xs = x.float() - shift.float().cpu()
    xb = bf16_values(xs).double()
    if w.diagonal:
        lin, quad, bias = (t.double() for t in (w.lin, w.quad, w.bias))
        xx = bf16_values(xs * xs).double()
        return xb @ lin.T + xx @ quad.T + bias, xb.abs() @ lin.abs().T - xx @ quad.T
    a = torch.cat([xb, bound_rows_reference(xs).double()], 1)
    b = torch.cat([w.lin, w.columns], 1).double()
    return a @ b.T, a.abs() @ b.abs().T


@triton.jit
def _directed_kernel(x_ptr, up_ptr, down_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(up_ptr + offs, round_bf16_directed(x, True))
    tl.store(down_ptr + offs, round_bf16_directed(x, False))


def test_bfloat16_rounding_up_and_down_brackets_every_value_by_its_bfloat16_neighbours():
    """``bf16_values`` (torch) and ``tile.round_bf16_directed`` (kernel): a bfloat16 value on the
    given side of each float32 value, and its nearest there, at every sign and magnitude (bfloat16
    values, zeros and infinities kept); to nearest, it is torch's cast but at ties."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-30, 31, (4096,), generator=gen).float()
    x[:8] = torch.tensor([0.0, -0.0, 1.0, -3.5, float("inf"), float("-inf"), 1e-40, -1e38])
    up, down = bf16_values(x, 1), bf16_values(x, -1)
    got = torch.empty(2, len(x), device=DEVICE)
    _directed_kernel[(1,)](x.to(DEVICE), got[0], got[1], BLOCK=len(x))
    assert torch.equal(got.cpu(), torch.stack([up, down]))
    for r in (up, down, bf16_values(x)):
        assert torch.equal(r.to(torch.bfloat16).float(), r)
    assert (down <= x).all() and (x <= up).all()
    finite = torch.isfinite(x)
    inf = torch.full_like(x, float("inf")).to(torch.bfloat16)
    assert (torch.nextafter(up.to(torch.bfloat16), -inf).float()[finite] < x[finite]).all()
    assert (torch.nextafter(down.to(torch.bfloat16), inf).float()[finite] > x[finite]).all()
    tie = (up - x) == (x - down)
    assert torch.equal(bf16_values(x)[~tie], x[~tie].to(torch.bfloat16).float())


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("kind", ["raw", "standardised", "spread"])
def test_upper_bound_covers_the_exact_log_density(kind, diagonal):
    """U (products of the rounded operands, plus what the weights fold in) is at least the
    float64 log-density of every row and component, with room left for the float32 sums of the
    products (gamma_2D of their sizes, gamma_{D+16} with the spherical bound's columns), at
    variances from 1e-30 to 1e30 ("spread") and zero linear weights; and at each row's best
    component it exceeds the log-density by a few bfloat16 units of the products' sizes, no more."""
    gen = torch.Generator().manual_seed(5)
    x = make_rows(300, 37, "standardised" if kind == "spread" else kind, gen)
    params, shift = random_mixture(x, 19, diagonal, gen)
    if kind == "spread":
        scale = 10.0 ** torch.empty(19, 37, dtype=torch.float64).uniform_(-30, 30, generator=gen)
        if not diagonal:
            scale = scale[:, :1]
        params = params._replace(lin=params.lin * scale, quad=params.quad * (scale if diagonal else scale[:, 0]))
        params.lin[0] = 0.0
    split, _ = kparams.split_offset(params.to(dtype=torch.float32))
    upper, sizes = bound_rule(x, shift, split)
    exact = weighted_log_prob(x.double(), split.to(dtype=torch.float64), shift.float().double())
    assert torch.isfinite(upper).all()
    products = 2 * 37 if diagonal else 37 + BOUND_COLUMNS
    assert (upper - products * 2.0 ** -23 * sizes >= exact).all()
    if kind != "spread":
        over = (upper - exact).gather(1, exact.argmax(1, keepdim=True))
        assert (over <= 6 * 2.0 ** -8 * sizes.gather(1, exact.argmax(1, keepdim=True))).all()


@pytest.mark.parametrize("d", [1, 37, 300])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_upper_bound_holds_where_every_rounding_errs_the_same_way(d, diagonal):
    """Rows and weights all of one sign and each just past a bfloat16 rounding point, so that every
    product rounds down by nearly a unit and the errors add up (Cauchy-Schwarz is tight for parallel
    rows and weights): where the bound has the least room, U still covers the float64 log-density
    with room for the float32 sums (as ``test_upper_bound_covers_the_exact_log_density``)."""
    gen = torch.Generator().manual_seed(d)
    past = 1 + 2.0 ** -9 - 2.0 ** -20  # rounds down to 1 in bfloat16, by almost half a unit
    x = 2.0 ** torch.randint(-4, 8, (40, 1), generator=gen).float() * past * torch.ones(40, d)
    k = 8
    lin = 2.0 ** torch.randint(-6, 6, (k, 1), generator=gen).double() * past * torch.ones(k, d).double()
    quad = -(2.0 ** torch.randint(-6, 6, (k, d) if diagonal else (k,), generator=gen).double()) * past
    const = 100 * torch.randn(k, generator=gen, dtype=torch.float64)
    split, _ = kparams.split_offset(kparams.NaturalParams(quad, lin, const).to(dtype=torch.float32))
    shift = torch.zeros(d)
    upper, sizes = bound_rule(x, shift, split)
    exact = weighted_log_prob(x.double(), split.to(dtype=torch.float64), shift.double())
    products = 2 * d if diagonal else d + BOUND_COLUMNS
    assert (upper - products * 2.0 ** -23 * sizes >= exact).all()


@pytest.mark.parametrize("n,d,k,blocks", SHAPES)
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_candidate_pass_marks_what_its_bound_rule_marks(n, d, k, blocks, diagonal, poisoned_empty):
    """The candidate pass (``candidates`` where D fits one tile, else ``candidates_wide`` in blocks
    of 16 rows) marks a component exactly when the float64 replay of its bound reaches the
    floor, away from float32 ties with it: the bound's formula is what the kernel computes, not
    only a bound loose enough to hold the margin."""
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    xd, split, sh, _, _ = prepared(x, params, shift)
    search_w, centred = search_weights(split, DEVICE), exact_candidates.centred_params(split)
    exact = weighted_log_prob(x.double(), split.to(dtype=torch.float64).to("cpu"), shift.float().double())
    hint = exact.argmax(1).to(DEVICE, torch.int32)
    floor = exact_log_probs(xd, sh, *centred, hint, less=3.0).cpu()
    if d <= blocks[2]:
        marks = candidates(xd, sh, search_w, centred, hint, 3.0, config(blocks))
    else:
        marks = candidates_wide(xd, sh, search_w, centred, hint, 3.0, config(blocks), rows=16)
    marks = marks.cpu().long()
    got = ((marks[:, :, None] >> torch.arange(32)) & 1).flatten(1)[:, :k].bool()
    upper, _ = bound_rule(x, shift, split.to("cpu"))
    want = upper >= floor.double()[:, None]
    clear = (upper - floor.double()[:, None]).abs() > 1e-4 * (upper.abs() + 1)
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], want[clear])
    assert want.sum() < want.numel() or k == 1  # the rule leaves components out


@pytest.mark.parametrize("wide", [False, True], ids=["fused", "wide"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_rows_whose_hint_has_weight_zero_mark_every_weighted_component_and_nothing_else(wide, diagonal,
                                                                                      poisoned_empty):
    """A hint of weight 0 gives a floor of -inf: the row then marks every component of positive
    weight, none of weight 0 and no padding past K (here 19 components, one word, 13 bits past K),
    while rows with a good hint in the same tile keep their few marks."""
    n, d, k = 40, 12, 19
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    params = params._replace(const=params.const.clone())
    params.const[[3, 11]] = -math.inf
    xd, split, sh, _, _ = prepared(x, params, shift)
    search_w, centred = search_weights(split, DEVICE), exact_candidates.centred_params(split)
    exact = weighted_log_prob(x.double(), split.to(dtype=torch.float64).to("cpu"), shift.float().double())
    hint = exact.argmax(1).to(torch.int32)
    hint[::2] = 3
    hint = hint.to(DEVICE)
    if wide:
        marks = candidates_wide(xd, sh, search_w, centred, hint, 3.0, config((16, 32, 32)), rows=16)
    else:
        marks = candidates(xd, sh, search_w, centred, hint, 3.0, config((16, 32, 16)))
    marks = marks.cpu().long()
    got = ((marks[:, :, None] >> torch.arange(32)) & 1).flatten(1).bool()
    assert not got[:, k:].any()
    weighted = torch.ones(k, dtype=torch.bool)
    weighted[[3, 11]] = False
    assert (got[::2, :k] == weighted).all()
    assert not got[1::2, [3, 11]].any()
    assert got[1::2, :k].sum(1).float().mean() < k - 2


@pytest.mark.parametrize("n,d,k,blocks", SHAPES)
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_exact_log_probs_match_float64(n, d, k, blocks, diagonal, poisoned_empty):
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    xd, split, sh, weights, _ = prepared(x, params, shift)
    comp = torch.randint(k, (n,), generator=torch.Generator().manual_seed(n + k))
    got = exact_log_probs(xd, sh, *exact_candidates.centred_params(split), comp.to(DEVICE, torch.int32)).cpu()
    exact = weighted_log_prob(x.double(), split.to(dtype=torch.float64).to("cpu"), shift.float().double())
    assert relative_error(got, exact.gather(1, comp[:, None])[:, 0]) < TOLERANCE


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_exact_pass_walks_agree(diagonal, poisoned_empty, monkeypatch):
    """Rows walking their own marks (components gathered row by row) and blocks walking the marks
    of all their rows (each component loaded once), one row or four a program, over marks of three
    words walked one at a time (rows load their next word when theirs is spent): the same counts,
    slots and best components as one row walking all its words at once, log Z and
    responsibilities to float32 round-off (the sums run in other orders)."""
    from flashgmm_ivf.kernels import candidate_resp as module
    n, d, k = 10, 20, 70
    x, params, shift = mixture(71, d, k, "standardised", diagonal)  # means drawn from 71 rows
    xd, split, sh, weights, _ = prepared(x[:n], params, shift)
    centred = exact_candidates.centred_params(split)
    marks = search("fused", xd, sh, split, (16, 64, 32))(xd, centred, 20.0, None)
    assert ((marks.cpu() != 0).sum(1) >= 2).sum() >= 3  # rows whose walk goes on into a later word

    def walked(shared, rows):
        monkeypatch.setattr(module, "walk", lambda *_: (shared, rows))
        return [t.cpu() for t in candidate_resp(xd, sh, *centred, marks, k, min_resp=1e-9)]

    ref = walked(False, 1)
    kept = ref[5]
    assert kept.min() >= 1
    monkeypatch.setattr(module, "WORDS", 1)
    for walk in [(False, 1), (False, 4), (True, 1), (True, 4)]:
        for name, g, e in zip(("log_norm", "resp", "best", "cand", "count", "kept"), walked(*walk), ref):
            if g.dim() == 2:  # slots past a row's kept ones are unwritten
                g, e = (torch.cat([t[i, :kept[i]] for i in range(n)]) for t in (g, e))
            if g.dtype == torch.float32:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"{name} of walk {walk}")
            else:
                assert torch.equal(g, e), f"{name} of walk {walk}"


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_exact_pass_reads_rows_wider_than_its_register_tile_tile_by_tile(diagonal, poisoned_empty, monkeypatch):
    """Rows wider than ``ONE_TILE_FEATURES`` are re-read in 64-wide tiles per candidate: the
    same log Z, responsibilities and slots to float32 round-off as rows held in registers."""
    from flashgmm_ivf.kernels import candidate_resp as module
    n, d, k = 37, 150, 19
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    xd, split, sh, weights, _ = prepared(x, params, shift)
    centred = exact_candidates.centred_params(split)
    marks = search("wide", xd, sh, split, (16, 32, 32))(xd, centred, 30.0, None)
    held = candidate_resp(xd, sh, *centred, marks, k)
    monkeypatch.setattr(module, "ONE_TILE_FEATURES", 128)
    tiled = candidate_resp(xd, sh, *centred, marks, k)
    for name in ("best", "cand", "count", "kept"):
        i = ("log_norm", "resp", "best", "cand", "count", "kept").index(name)
        assert torch.equal(held[i].cpu(), tiled[i].cpu()), name
    torch.testing.assert_close(held[0].cpu(), tiled[0].cpu(), rtol=1e-6, atol=1e-4)


# Several D tiles are the candidate test's (61, 70, 50): here they would only add interpreter time.
@pytest.mark.parametrize("n,d,k,blocks", [s for s in SHAPES if s[:3] != (61, 70, 50)])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("kind", ["raw", "standardised"])
def test_estep_matches_float64_dense(n, d, k, blocks, diagonal, kind, poisoned_empty):
    x, params, shift = mixture(n, d, k, kind, diagonal)
    ref = kernels.reference.estep(x.double(), params, shift)
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE, torch.float32), shift.to(DEVICE), precision="candidates",
                        configs=(config(blocks), None))
    for name, g, r in zip(ref._fields, got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) entries"
        assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))


# Several D tiles are the candidate test's (61, 70, 50): here they would only add interpreter time.
@pytest.mark.parametrize("n,d,k,blocks", [s for s in SHAPES if s[:3] != (61, 70, 50)])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("kind", ["raw", "standardised"])
def test_estep_by_the_wide_pass_in_blocks_matches_float64_dense(n, d, k, blocks, diagonal, kind, poisoned_empty):
    x, params, shift = mixture(n, d, k, kind, diagonal)
    ref = kernels.reference.estep(x.double(), params, shift)
    xd, split, sh, weights, offset = prepared(x, params, shift)
    got, _ = exact_candidates.estep(xd, exact_candidates.centred_params(split), sh, diagonal,
                                    search("wide", xd, sh, split, blocks),
                                    lambda rows: kernels.estep(rows, split, sh, precision="bf16x3"))
    got = got._replace(log_norm=got.log_norm + offset.to(got.log_norm.device))
    for name, g, r in zip(ref._fields, got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) entries"
        assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))


@pytest.mark.parametrize("k,capacity", [(7, 8), (19, 8), (19, 32)], ids=["all-candidates", "overflow", "fits"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("how", ["fused", "wide"])
def test_flat_posteriors(k, capacity, diagonal, how, poisoned_empty):
    """Identical components: every component is a candidate; beyond the capacity every row
    takes the dense path."""
    n, d = 53, 20
    x, params, shift = mixture(n, d, k, "raw", diagonal, flat=True)
    ref = kernels.reference.estep(x.double(), params, shift)
    xd, split, sh, weights, offset = prepared(x, params, shift)
    got, overflowed = exact_candidates.estep(
        xd, exact_candidates.centred_params(split), sh, diagonal, search(how, xd, sh, split, (16, 32, 32)),
        lambda rows: kernels.estep(rows, split, sh, precision="bf16x3"), capacity=capacity)
    assert overflowed == (n if k > capacity else 0)
    got = got._replace(log_norm=got.log_norm + offset.to(got.log_norm.device))
    for name, g, r in zip(ref._fields, got, ref):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))


def test_some_rows_overflow(poisoned_empty, monkeypatch):
    """A capacity of 2 on a flat-ish mixture: overflowed and candidate rows mix in one block,
    which is taken in sub-blocks of 16 rows (the last one short)."""
    monkeypatch.setattr(exact_candidates, "SUB_BLOCK_BYTES", 16 * (8 * 2 + 4))  # capacity 2, one word: 16 rows
    n, d, k = 97, 9, 13
    x, params, shift = mixture(n, d, k, "standardised", True)
    ref = kernels.reference.estep(x.double(), params, shift)
    xd, split, sh, weights, offset = prepared(x, params, shift)
    got, overflowed = exact_candidates.estep(
        xd, exact_candidates.centred_params(split), sh, True, search("fused", xd, sh, split, (16, 32, 16)),
        lambda rows: kernels.estep(rows, split, sh, precision="bf16x3"), capacity=2, margin=10.0)
    assert 0 < overflowed < n
    got = got._replace(log_norm=got.log_norm + offset.to(got.log_norm.device))
    for name, g, r in zip(ref._fields, got, ref):
        assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_static_estep_matches_float64_and_counts_what_its_sizes_leave_out(diagonal, poisoned_empty, monkeypatch):
    """``static=True`` (what a CUDA graph captures) takes its sizes from hints grown by a host-sized
    E-step. With eight slots a row most rows overflow and are taken against every component
    (``kernels.overflow_rows``), in sub-blocks of 16 rows: statistics, log Z and every row's best (overflowed
    rows' too) are float64's, and nothing is short. Fewer pair slots or overflowed rows than needed
    are counted in ``hints.short``, one for one."""
    # Capacity 8, one word: host-sized sub-blocks of 8 rows, static ones (one held at a time) of 16.
    monkeypatch.setattr(exact_candidates, "SUB_BLOCK_BYTES", 8 * (8 * 8 + 4))
    n, d, k = 97, 9, 13
    x, params, shift = mixture(n, d, k, "standardised", diagonal)
    ref = kernels.reference.estep(x.double(), params, shift)
    ll = weighted_log_prob(x.double(), params, shift)
    xd, split, sh, weights, offset = prepared(x, params, shift)

    def run(hints, static):
        return exact_candidates.estep(
            xd, exact_candidates.centred_params(split), sh, diagonal, search("fused", xd, sh, split, (16, 32, 16)),
            lambda rows: kernels.estep(rows, split, sh, precision="bf16x3"), hints=hints, capacity=8, margin=15.0,
            static=static)

    hints = exact_candidates.Hints(ll.argmax(1).to(DEVICE, torch.int32))
    with pytest.raises(ValueError, match="host-sized"):
        run(hints, True)
    _, n_over = run(hints, False)
    assert 0 < n_over < n and hints.pairs > 0 and hints.rows == 2 * n_over + 8 and int(hints.short) == 0
    # Random threshold components: more rows overflow, all within the room given.
    scattered = torch.randint(k, (n,), generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.int32)
    hints.best.copy_(scattered)
    hints.rows = n
    got, over = run(hints, True)
    assert 0 < int(over) < n and int(hints.short) == 0
    got = got._replace(log_norm=got.log_norm + offset.to(got.log_norm.device))
    for name, g, r in zip(ref._fields, got, ref):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))
    top2 = ll.topk(2, 1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-3
    assert torch.equal(hints.best.cpu().long()[clear], ll.argmax(1)[clear])
    hints.rows = int(over) - 3
    hints.best.copy_(scattered)
    run(hints, True)
    assert int(hints.short) == 3
    hints.rows = n
    shorts = []
    for pairs in (1, 2):
        hints.pairs = pairs
        hints.best.copy_(scattered)
        run(hints, True)
        shorts.append(int(hints.short))
    assert shorts[0] >= 2 and shorts[0] - shorts[1] == 1


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_estep_rows_that_overflow_take_the_dense_estep_with_the_offset_put_back(diagonal, monkeypatch,
                                                                                poisoned_empty):
    """kernels.estep(precision="candidates") with two slots a row: overflowed rows take the dense
    E-step of the unsplit parameters, whose log Z carries the offset the candidates' do not."""
    monkeypatch.setattr(exact_candidates, "CAPACITY", {"diag": 2, "spherical": 2})
    x, params, shift = mixture(203, 37, 19, "raw", diagonal)
    ref = kernels.reference.estep(x.double(), params, shift)
    calls = []
    real = exact_candidates.estep
    monkeypatch.setattr(exact_candidates, "estep", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    got = kernels.estep(x.to(DEVICE), params.to(DEVICE, torch.float32), shift.to(DEVICE), precision="candidates",
                        configs=(config((16, 32, 16)), None))
    assert 0 < calls[0][1] < len(x)
    for name, g, r in zip(ref._fields, got, ref):
        assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_wide_rows_rank_by_library_products_then_take_the_wide_pass_on_a_gpu(diagonal, monkeypatch):
    """kernels.estep(precision="candidates") at D >= GEMM_FROM_FEATURES ranks hint-less rows by
    library products (gemm.log_norm) and marks candidates by the wide pass, with hints too (and
    both match the float64 dense E-step)."""
    from flashgmm_ivf.kernels.estep import GEMM_FROM_FEATURES
    estep_module = importlib.import_module("flashgmm_ivf.kernels.estep")
    n, d, k = 700, GEMM_FROM_FEATURES["diag" if diagonal else "spherical"] + 3, 23
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    calls = []
    ranking, wide = gemm.log_norm, candidates_wide
    monkeypatch.setattr(gemm, "log_norm", lambda *a, **kw: calls.append("ranking") or ranking(*a, **kw))
    monkeypatch.setattr(estep_module, "candidates_wide", lambda *a, **kw: calls.append("wide") or wide(*a, **kw))
    ref = kernels.reference.estep(x.double(), params, shift)
    given = exact_candidates.Hints(torch.zeros(n, dtype=torch.int32, device="cuda"))
    for hints in (None, given):
        got = kernels.estep(x.cuda(), params.to("cuda", torch.float32), shift.cuda(), precision="candidates",
                            hints=hints)
        for name, g, r in zip(ref._fields, got, ref):
            assert relative_error(g.cpu(), r) < TOLERANCE, (name, relative_error(g.cpu(), r))
    assert calls == ["ranking", "wide", "wide"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,k", [(1, 1), (37, 19), (300, 5)], ids=["one", "odd", "wide"])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_candidate_weights_match_the_torch_functions_they_fuse(d, k, diagonal, dtype):
    """``candidate_weights`` (two launches) against split_offset, kernel_weights("bf16"),
    search_weights and centred_params: bfloat16 pieces within one bfloat16 step (ties round away
    from zero there, to even in torch), float32 values within float32 round-off; a component of
    zero weight (-inf constant) keeps it, and the offset is the largest finite constant."""
    gen = torch.Generator().manual_seed(d + 7 * k)
    x = make_rows(max(40, 2 * k), d, "raw", gen)
    params, _ = random_mixture(x, k, diagonal, gen)
    params = params._replace(const=params.const.clone())
    if k > 1:
        params.const[k // 2] = float("-inf")
    params = params.to(DEVICE, dtype)
    got = candidate_weights(params, DEVICE)
    ref = candidate_weights_reference(params, DEVICE)
    assert got.offset.dtype == torch.float64 and got.offset.shape == ()
    assert torch.allclose(got.offset, ref.offset.double(), rtol=1e-7, atol=0)
    for name in ("lin_hi", "quad_hi", "const"):
        g, r = getattr(got.weights, name), getattr(ref.weights, name)
        assert g.shape == r.shape and g.dtype == r.dtype, name
        g, r = g.float().cpu(), r.float().cpu()
        assert torch.equal(torch.isinf(g), torch.isinf(r)), name
        finite = torch.isfinite(r)
        step = 2.0 ** -7 if g.dim() == 2 else 2.0 ** -22  # one bfloat16 / a few float32 units, relative
        assert ((g - r).abs()[finite] <= step * r.abs()[finite] + 1e-30).all(), name
    if diagonal:  # the fused pass's operand: the same pieces side by side
        assert torch.equal(got.search.lin_quad, torch.cat([got.search.lin, got.search.quad], 1))
    for name in ("lin", "quad", "bias", "lin_quad", "columns"):
        g, r = getattr(got.search, name), getattr(ref.search, name)
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape and g.dtype == r.dtype, name
        g, r = g.float().cpu(), r.float().cpu()
        step = 2.0 ** -7
        if name == "columns":  # q1 + q2, b1 + b2 (float32 values in two pieces), then w~ and the zeros
            g, r = (torch.cat([t[:, 0:1] + t[:, 1:2], t[:, 4:5] + t[:, 5:6], t[:, 6:]], 1) for t in (g, r))
            step = torch.tensor([2.0 ** -21] * 2 + [2.0 ** -7] * 10).expand_as(r)[torch.isfinite(r)]
        assert torch.equal(torch.isinf(g), torch.isinf(r)), name
        finite = torch.isfinite(r)
        assert ((g - r).abs()[finite] <= step * r.abs()[finite] + 1e-30).all(), name
    for name, g, r in zip(("means", "precisions", "consts"), got.centred, ref.centred):
        g, r = g.cpu(), r.cpu()
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        assert torch.equal(torch.isinf(g), torch.isinf(r)), name
        finite = torch.isfinite(r)
        assert ((g - r).abs()[finite] <= 2.0 ** -22 * r.abs()[finite] + 1e-30).all(), name


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_hints_of_any_components_give_the_same_statistics_and_come_back_as_the_best(diagonal, poisoned_empty):
    """``hints.best``: the threshold's component may be any (here random, then the rows' worst); the
    statistics still match float64, and ``hints.best`` comes back as each row's best component."""
    n, d, k = 203, 37, 19
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    ref = kernels.reference.estep(x.double(), params, shift)
    ll = weighted_log_prob(x.double(), params, shift)
    for hints in (torch.randint(k, (n,), generator=torch.Generator().manual_seed(1)), ll.argmin(1)):
        best = hints.to(DEVICE, torch.int32)
        got = kernels.estep(x.to(DEVICE), params.to(DEVICE, torch.float32), shift.to(DEVICE), precision="candidates",
                            configs=(config((32, 32, 64)), None), hints=exact_candidates.Hints(best))
        for name, g, r in zip(ref._fields, got, ref):
            assert relative_error(g, r) < TOLERANCE, (name, relative_error(g, r))
        top2 = ll.topk(2, 1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-3  # rows whose best is not a float32 tie
        assert clear.sum() > n // 2
        assert torch.equal(best.cpu().long()[clear], ll.argmax(1)[clear])


def test_hints_are_checked():
    x, params, shift = mixture(37, 5, 3, "raw", True)
    x, params, shift = x.to(DEVICE), params.to(DEVICE, torch.float32), shift.to(DEVICE)
    wrong, right = (exact_candidates.Hints(torch.zeros(n, dtype=torch.int32, device=DEVICE)) for n in (36, 37))
    with pytest.raises(ValueError, match="hints.best must be a contiguous int32 tensor of shape \\(37,\\)"):
        kernels.estep(x, params, shift, precision="candidates", hints=wrong)
    with pytest.raises(ValueError, match="candidates' only"):
        kernels.estep(x, params, shift, precision="bf16x3", hints=right)


def kernel_fit(monkeypatch, max_iter):
    """(rows, GaussianMixture keywords from a shared start, the float64 fit of them) for fits
    whose float32 E-step takes the kernels (without a GPU, in the interpreter)."""
    gen = torch.Generator().manual_seed(3)
    x = make_rows(300, 6, "raw", gen).numpy()
    start = GaussianMixture(4, covariance_type="diag", max_iter=1, random_state=0, device=DEVICE).fit(x)
    init = dict(weights_init=start.weights_, means_init=start.means_, precisions_init=start.precisions_,
                covariance_type="diag", max_iter=max_iter, tol=0, chunk_size=128, device=DEVICE)
    ref = GaussianMixture(4, compute_dtype="float64", **init).fit(x)
    if DEVICE == "cpu":
        monkeypatch.setattr(GaussianMixture, "_uses_kernels", lambda self, device: self.compute_dtype == "float32")
    return x, init, ref


@pytest.mark.filterwarnings("ignore:Best performing initialization did not converge")
def test_fit_hands_each_blocks_best_components_to_the_next_estep(monkeypatch):
    """GaussianMixture(precision="candidates") keeps each block's best components between EM
    iterations (without a GPU, its kernel path runs in the interpreter): every E-step after the
    first reads the previous one's, which are the rows' best under the previous parameters,
    and the fit is float64's."""
    x, init, ref = kernel_fit(monkeypatch, max_iter=4)
    real, seen = kernels.estep, []

    def spy(rows, params, shift, **kw):
        best = kw["hints"].best
        before = best.clone()
        out = real(rows, params, shift, **kw)
        ll = weighted_log_prob(rows.double(), params.to(dtype=torch.float64), shift.double())
        seen.append((rows.shape[0], before, best, best.clone(), ll))
        return out

    monkeypatch.setattr(kernels, "estep", spy)
    got = GaussianMixture(4, precision="candidates", **init).fit(x)
    sizes = [s[0] for s in seen]
    blocks = len(sizes) // 4  # E-steps per iteration (GPU-cached data: one block)
    assert sizes == sizes[:blocks] * 4 and sum(sizes[:blocks]) == 300
    for i, (_, before, kept, after, ll) in enumerate(seen):
        assert torch.equal(after.long(), ll.argmax(1))
        if i >= blocks:
            previous = seen[i - blocks]
            assert kept is previous[2] and torch.equal(before.long(), previous[4].argmax(1))
    assert got._hints is None
    np.testing.assert_allclose(got.means_, ref.means_, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got.lower_bounds_, ref.lower_bounds_, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Best performing initialization did not converge")
def test_fit_replays_static_esteps_and_runs_again_host_sized_where_their_sizes_fall_short(monkeypatch):
    """A fit whose EM iteration is a CUDA graph (``_graph.GraphedStep``: its first call runs eagerly,
    later ones replay what was captured, stood in for here by calls while ``_capturing``) replays
    static E-steps. Where their sizes fall short (forced: the first block's first growth leaves one
    pair slot), the iteration runs again host-sized, growing them, and is captured again. The fit
    is float64's."""
    from flashgmm_ivf import mixture as mixture_module
    estep_module = importlib.import_module("flashgmm_ivf.kernels.estep")
    x, init, ref = kernel_fit(monkeypatch, max_iter=6)
    capturing, graphs, statics, grown = [False], [], [], []

    class Replayed:
        def __init__(self, fn):
            self.fn, self.calls = fn, 0
            graphs.append(self)

        def __call__(self, *inputs):
            self.calls += 1
            capturing[0] = self.calls > 1
            try:
                return self.fn(*inputs)
            finally:
                capturing[0] = False

    real_estep, real_grow = exact_candidates.estep, exact_candidates.Hints.grow

    def grow(hints, *args):
        real_grow(hints, *args)
        grown.append(hints)
        if len(grown) == 1:
            hints.pairs = 1

    monkeypatch.setattr(estep_module, "_capturing", lambda rows: capturing[0])
    monkeypatch.setattr(exact_candidates, "estep",
                        lambda *a, **kw: statics.append(kw["static"]) or real_estep(*a, **kw))
    monkeypatch.setattr(exact_candidates.Hints, "grow", grow)
    monkeypatch.setattr(mixture_module, "GraphedStep", Replayed)
    monkeypatch.setattr(GaussianMixture, "_graphable", lambda self, source, device: True)
    got = GaussianMixture(4, precision="candidates", **init).fit(x)
    blocks = len(statics) // 8  # E-steps per iteration; one runs twice, one is queued and dropped
    assert blocks >= 1 and len(statics) == 8 * blocks
    # eager; replayed, short, and the one queued behind it (dropped); again host-sized; eager (a new
    # capture); replayed three times (each queued by the one before)
    assert statics == [False] * blocks + [True] * 2 * blocks + [False] * 2 * blocks + [True] * 3 * blocks
    assert len(graphs) == 2
    np.testing.assert_allclose(got.means_, ref.means_, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got.lower_bounds_, ref.lower_bounds_, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("short", [False, True], ids=["sizes-hold", "first-sizes-short"])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_fit_on_a_gpu_captures_the_candidates_iteration_as_a_cuda_graph(covariance_type, short, monkeypatch):
    """On a GPU the 'candidates' EM iteration is captured (no warning that it runs eagerly) and
    replayed; where the first sizes fall short (forced) it is captured again. The fit equals
    the one that never captures (overflowed rows differ in float32 round-off only)."""
    from flashgmm_ivf import mixture as mixture_module
    graphs = []
    real_graph, real_grow = mixture_module.GraphedStep, exact_candidates.Hints.grow
    monkeypatch.setattr(mixture_module, "GraphedStep", lambda fn: graphs.append(real_graph(fn)) or graphs[-1])
    # Grouping the rows captures the iteration once more (tests/test_gpu.py): not here.
    monkeypatch.setattr(mixture_module, "GROUP_ROWS_AFTER", frozenset())
    if short:
        def grow(hints, *args):
            first = not hints.pairs
            real_grow(hints, *args)
            if first and len(graphs) == 1:
                hints.pairs = 1
        monkeypatch.setattr(exact_candidates.Hints, "grow", grow)
    x = make_rows(20_000, 32, "raw", torch.Generator().manual_seed(4)).numpy()
    kw = dict(covariance_type=covariance_type, precision="candidates", max_iter=8, tol=0, random_state=0,
              device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", "Best performing initialization did not converge")
        graphed = GaussianMixture(16, **kw).fit(x)
    assert len(graphs) == (2 if short else 1) and all(g._graph is not None for g in graphs)
    monkeypatch.setattr(GaussianMixture, "_graphable", lambda self, source, device: False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Best performing initialization did not converge")
        eager = GaussianMixture(16, **kw).fit(x)
    np.testing.assert_allclose(graphed.lower_bounds_, eager.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(graphed.means_, eager.means_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(graphed.covariances_, eager.covariances_, rtol=1e-5)


def test_candidate_pass_refuses_tiles_that_split_a_word():
    x, params, shift = mixture(37, 5, 3, "raw", True)
    xd, split, sh, _, _ = prepared(x, params, shift)
    operands = (search_weights(split, DEVICE), exact_candidates.centred_params(split),
                torch.zeros(37, dtype=torch.int32, device=DEVICE), 30.0)
    with pytest.raises(ValueError, match="multiple of 32"):
        candidates(xd, sh, *operands, config((16, 16, 16)))
    with pytest.raises(ValueError, match="multiple of 32"):
        candidates_wide(xd, sh, *operands, config((16, 16, 16)))


def test_fused_candidate_pass_refuses_rows_wider_than_its_tile():
    x, params, shift = mixture(37, 40, 3, "raw", True)
    xd, split, sh, _, _ = prepared(x, params, shift)
    with pytest.raises(ValueError, match="D = 40 exceeds block_d = 32"):
        candidates(xd, sh, search_weights(split, DEVICE), exact_candidates.centred_params(split),
                   torch.zeros(37, dtype=torch.int32, device=DEVICE), 30.0, config((16, 32, 32)))


@pytest.mark.parametrize("n, capacity, first_row", [(1, 1, 0), (37, 3, 5), (203, 64, 0), (45, 128, 1000)])
def test_kept_pairs_gather_what_torch_indexing_gathers(n, capacity, first_row):
    gen = torch.Generator().manual_seed(n + capacity)
    kept = torch.randint(0, capacity + 1, (n,), generator=gen, dtype=torch.int32)
    kept[::3] = 0                      # rows that keep nothing (overflowed, or none worth keeping)
    kept[1::7] = capacity              # rows whose slots are all kept
    cand = torch.randint(0, 1 << 20, (n, capacity), generator=gen, dtype=torch.int32)
    resp = torch.rand(n, capacity, generator=gen)
    kept, cand, resp = (t.to(DEVICE) for t in (kept, cand, resp))
    ends = torch.cumsum(kept, 0)
    n_kept = int(ends[-1])
    got = kept_pairs(cand, resp, kept, ends, n_kept, first_row=first_row)
    want = kept_pairs_reference(cand, resp, kept, n_kept, first_row=first_row)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    # The rows come out ascending, as the statistics pass's stable sort expects.
    assert bool((got[0][1:] >= got[0][:-1]).all())
    # Into a buffer after 5 earlier pairs, 3 entries short: what fits lands, nothing else is written.
    out = tuple(torch.full((n_kept + 2,), -7, dtype=w.dtype, device=DEVICE) for w in want)
    kept_pairs_into(out, cand, resp, kept, ends + 5, first_row=first_row)
    for o, w in zip(out, want):
        assert (o[:5] == -7).all() and torch.equal(o[5:], w[:n_kept - 3])


@pytest.mark.parametrize("n, d, k", [(1, 1, 1), (37, 5, 3), (71, 20, 70), (45, 129, 11), (131, 128, 130)])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_overflow_rows_take_every_component_as_torch_does_and_skip_padding(n, d, k, diagonal):
    """``overflow_pairs_into`` (a captured E-step's overflowed rows) against its torch reference and
    float64: listed rows get log Z, best and their triples of r >= min_resp at their entry's K
    positions; -1 entries and unlisted rows are left as they were."""
    x, params, shift = mixture(n, d, k, "raw", diagonal)
    xd, split, sh, _, _ = prepared(x, params, shift)
    centred = exact_candidates.centred_params(split)
    listed = torch.arange(n - 1, -1, -2)  # every other row, last first
    over = torch.cat([listed, torch.full((3,), -1)]).to(DEVICE)
    min_resp = float(np.exp(-15.0))
    ll = weighted_log_prob(x.double(), split.to("cpu", torch.float64), shift)

    def poisoned():
        return (torch.full((n,), float("nan"), dtype=torch.float64, device=DEVICE),
                torch.full((n,), -7, dtype=torch.int32, device=DEVICE),
                (torch.zeros(len(over) * k, dtype=torch.int32, device=DEVICE),
                 torch.full((len(over) * k,), k, dtype=torch.int32, device=DEVICE),
                 torch.zeros(len(over) * k, dtype=torch.float32, device=DEVICE)))
    log_norm, best, out = poisoned()
    overflow_pairs_into(out, xd, over, centred, sh, min_resp, log_norm, best)
    ref_norm, ref_best, _ = poisoned()
    want = overflow_pairs_reference(xd, over, centred, sh, min_resp, ref_norm, ref_best)
    lz = torch.logsumexp(ll, 1)
    assert torch.allclose(log_norm.cpu()[listed], lz[listed], rtol=TOLERANCE, atol=1e-3)
    assert torch.isnan(log_norm.cpu()[n % 2::2]).all() and (best.cpu()[n % 2::2] == -7).all()
    top2 = torch.cat([ll, torch.full((n, 1), -torch.inf, dtype=ll.dtype)], 1).topk(2, 1).values
    clear = listed[(top2[listed, 0] - top2[listed, 1]) > 1e-3]
    assert torch.equal(best.cpu()[clear].long(), ll.argmax(1)[clear])
    assert torch.equal(best, ref_best) or torch.equal(best.cpu()[clear], ref_best.cpu()[clear])
    r = torch.exp(ll[listed] - lz[listed, None])
    entries = torch.arange(len(listed))[:, None] * k + torch.arange(k)
    clear_r = ((r.log() + 15.0).abs() > 1e-3).flatten()  # not within round-off of the cut
    for got, ref in zip(out[:2], want[:2]):
        assert torch.equal(got.cpu()[entries.flatten()][clear_r], ref.cpu()[entries.flatten()][clear_r])
    # Responsibilities carry the float32 log-densities' round-off (sums in another order): ~1e-4 of
    # the rows' raw-scale quadratic terms, relative, at D = 129.
    assert torch.allclose(out[2], want[2], rtol=1e-3, atol=1e-9)
    assert (out[1][len(listed) * k:] == k).all() and (out[2][len(listed) * k:] == 0).all()
    kept = out[1].cpu()[entries] < k
    assert torch.equal(kept.flatten()[clear_r], (r >= min_resp).flatten()[clear_r])
    assert torch.allclose(out[2].cpu()[entries][kept].double(), r[kept], rtol=1e-3, atol=1e-9)
    assert (out[0].cpu()[entries][kept] == listed[:, None].expand(-1, k)[kept].int()).all()
