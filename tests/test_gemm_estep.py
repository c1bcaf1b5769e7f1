"""The bf16x3 E-step by library products (``kernels.gemm``) against the float64 torch reference,
and its two kernels (``kernels.split_rows``, ``kernels.split_resp``) against their torch references.

On the CPU its bfloat16 pieces are held in float32 and multiplied in float32, the arithmetic
a GPU's bf16 GEMMs with float32 accumulation run, and the kernels run in Triton's
interpreter; on a GPU the same tests run through cuBLAS. Several blocks of rows per call,
shapes not multiples of anything.
"""
import pytest
import torch

from flashgmm_ivf import kernels
from flashgmm_ivf.kernels import gemm
from flashgmm_ivf.kernels.params import kernel_weights, split_offset
from flashgmm_ivf.kernels.split_resp import split_resp
from flashgmm_ivf.kernels.split_rows import segment_width, split_rows
from test_kernels import make_rows, random_mixture, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 1), (37, 5, 3), (203, 37, 19), (530, 129, 70), (145, 1030, 5)]


def gemm_estep(x, params, shift, rows, precision="bf16x3"):
    params, offset = split_offset(params.to(DEVICE))
    weights = kernel_weights(params, precision, DEVICE)
    result = gemm.estep(x.to(DEVICE), shift.to(DEVICE, torch.float32), weights, precision=precision, rows=rows)
    return result._replace(log_norm=result.log_norm + offset.double())


@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
@pytest.mark.parametrize("kind", ["raw", "standardised"])
def test_gemm_estep_matches_float64_reference(n, d, k, diagonal, kind):
    gen = torch.Generator().manual_seed(n * 1000 + d + k)
    x = make_rows(n, d, kind, gen)
    params, shift = random_mixture(x, k, diagonal, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    got = gemm_estep(x, params, shift, rows=64)
    for name, g, r in zip(ref._fields, got, ref):
        assert g.shape == r.shape and g.dtype == torch.float64, name
        assert torch.isfinite(g).all(), name
        # The fused kernels' bf16x3 tolerance (tests/test_kernels.py): ~2e-5 measured.
        assert relative_error(g, r) < 1e-4, (name, relative_error(g, r))
    # bf16x3 products (~2^-17 of each term) summed in float32: a few 1e-6 of |log Z| at D ~ 1000
    assert ((got.log_norm.cpu() - ref.log_norm).abs() <= 1e-3 + 4e-6 * ref.log_norm.abs()).all()


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_gemm_single_bf16_product_is_loose_but_bounded(diagonal):
    """Precision "bf16": one product of the rounded operands, an honest ~1e-3 (as the fused kernels')."""
    gen = torch.Generator().manual_seed(11)
    x = make_rows(203, 37, "raw", gen)
    params, shift = random_mixture(x, 19, diagonal, gen)
    ref = kernels.reference.estep(x.double(), params, shift)
    errors = [relative_error(g, r) for g, r in zip(gemm_estep(x, params, shift, 64, "bf16")[1:], ref[1:])]
    assert max(errors) < 3e-2 and min(errors) > 1e-4, errors  # loose, and not secretly bf16x3


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_gemm_log_norm_and_best_component(diagonal):
    gen = torch.Generator().manual_seed(5)
    x = make_rows(300, 150, "raw", gen)
    params, shift = random_mixture(x, 23, diagonal, gen)
    ll = kernels.reference.weighted_log_prob(x.double(), params, shift, dtype=torch.float64)
    split, offset = split_offset(params.to(DEVICE, torch.float32))
    lz, best = gemm.log_norm(x.to(DEVICE), shift.to(DEVICE, torch.float32), kernel_weights(split, "bf16x3", DEVICE),
                             rows=100)
    torch.testing.assert_close(lz.double().cpu() + float(offset), torch.logsumexp(ll, 1), rtol=0, atol=1e-3)
    top2 = ll.topk(2, 1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # rows whose best component float32 can tell apart
    assert clear.sum() > 250
    assert torch.equal(best.long().cpu()[clear], ll.argmax(1)[clear])


@pytest.mark.parametrize("d", [1, 5, 70, 129])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_split_rows_one_segment_for_bf16(d, diagonal):
    gen = torch.Generator().manual_seed(d)
    x = make_rows(33, d, "standardised", gen)
    shift = x.mean(0)
    piece = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    out = torch.zeros(33, segment_width(d, diagonal), dtype=piece, device=DEVICE)
    sq = torch.empty(33, device=DEVICE)
    norm = torch.full((33,), float("nan"), device=DEVICE)
    split_rows(x.to(DEVICE), shift.to(DEVICE), diagonal, out, sq, precision="bf16")
    want, _ = gemm.split_rows_reference(x, shift, diagonal, "bf16")
    torch.testing.assert_close(out.float().cpu(), want, rtol=2 ** -7, atol=0)
    # The wide candidate pass's spherical operand, in the same pass: the norm of the x pieces.
    again = torch.zeros_like(out)
    split_rows(x.to(DEVICE), shift.to(DEVICE), diagonal, again, sq, precision="bf16", norm=norm)
    assert torch.equal(again, out)
    torch.testing.assert_close(norm.cpu(), torch.linalg.vector_norm(out[:, :d].float(), dim=1).cpu(),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("d", [1, 5, 70, 129])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_split_rows_matches_its_reference(d, diagonal, poisoned_empty):
    gen = torch.Generator().manual_seed(d)
    x = make_rows(77, d, "raw", gen)
    shift = x.double().mean(0).float()
    piece = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    out = torch.zeros(80, 3 * segment_width(d, diagonal), dtype=piece, device=DEVICE)
    sq = torch.empty(80, device=DEVICE)
    split_rows(x.to(DEVICE), shift.to(DEVICE), diagonal, out, sq)
    want, want_sq = gemm.split_rows_reference(x, shift, diagonal)
    got = out[:77].float().cpu()
    width = out.shape[1] // 3
    lo, hi, again = (got[:, s * width:(s + 1) * width] for s in range(3))
    assert torch.equal(hi, again)
    # The kernel rounds ties away from zero, torch to even: a piece may differ by one bfloat16
    # step, the value it stands for (hi + lo) may not.
    torch.testing.assert_close(hi + lo, want[:, width:2 * width] + want[:, :width], rtol=2 ** -16, atol=0)
    torch.testing.assert_close(hi, want[:, width:2 * width], rtol=2 ** -7, atol=0)
    assert (got[:, 2 * d if diagonal else d:width] == 0).all()  # padding stays zero
    torch.testing.assert_close(sq[:77].cpu(), want_sq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n,k", [(1, 1), (45, 7), (100, 300)])
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_split_resp_matches_its_reference(n, k, diagonal, poisoned_empty):
    gen = torch.Generator().manual_seed(n + k)
    prod = 30 * torch.randn(n, k, generator=gen)
    const = torch.randn(k, generator=gen)
    const[0] = float("-inf") if k > 1 else 0.0  # a component that takes no mass
    quad = -torch.rand(k, generator=gen)
    sq = 10 * torch.rand(n, generator=gen)
    piece = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    hi = torch.zeros(n, k + 3, dtype=piece, device=DEVICE)[:, :k]
    lo = torch.zeros(n, k + 3, dtype=piece, device=DEVICE)[:, :k]
    lz, nk, s2 = split_resp(*(t.to(DEVICE) for t in (prod, const, quad, sq)), hi, lo, diagonal=diagonal, block_n=16,
                            block_k=32)
    want_lz, want_hi, want_lo, want_nk, want_s2 = gemm.split_resp_reference(prod, const, quad, sq, diagonal)
    torch.testing.assert_close(lz.cpu(), want_lz, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close((hi.float() + lo.float()).cpu(), want_hi + want_lo, rtol=2 ** -16, atol=1e-7)
    torch.testing.assert_close(nk.cpu(), want_nk, rtol=1e-5, atol=1e-6)
    if diagonal:
        assert s2 is None
    else:
        torch.testing.assert_close(s2.cpu(), want_s2, rtol=1e-5, atol=1e-5)


def test_block_rows_bounds_memory_and_float32_sums():
    assert gemm.block_rows(1024, 960) <= gemm.MAX_BLOCK_ROWS
    assert gemm.block_rows(1 << 20, 4096) == 256  # never fewer rows than a useful product
    per_row = 4 * 3 * 1920 + 12 * 1024
    assert gemm.block_rows(1024, 960, budget=1000 * per_row) == 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_wide_rows_take_library_products_on_a_gpu(diagonal):
    """kernels.estep at D >= GEMM_FROM_FEATURES without launch settings is kernels.gemm's E-step."""
    from flashgmm_ivf.kernels.estep import GEMM_FROM_FEATURES
    gen = torch.Generator().manual_seed(7)
    x = make_rows(1000, GEMM_FROM_FEATURES["diag" if diagonal else "spherical"] + 3, "raw", gen)
    params, shift = random_mixture(x, 17, diagonal, gen)
    got = kernels.estep(x.cuda(), params.to("cuda"), shift.cuda())
    want = gemm_estep(x, params, shift, rows=None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_without_float32_output_gemms_wide_rows_keep_the_fused_kernels(monkeypatch):
    """A torch without bf16 GEMMs of float32 output (no aten mm.dtype) runs the fused kernels at any D."""
    from flashgmm_ivf.kernels.estep import GEMM_FROM_FEATURES
    gen = torch.Generator().manual_seed(8)
    x = make_rows(500, GEMM_FROM_FEATURES["diag"] + 3, "raw", gen).cuda()
    params, shift = random_mixture(x.cpu(), 9, True, gen)
    params, shift = params.to("cuda"), shift.cuda()
    monkeypatch.setattr(gemm, "AVAILABLE", False)
    fused = kernels.estep(x, params, shift, configs=kernels.default_configs(x.shape[1]))
    for g, f in zip(kernels.estep(x, params, shift), fused):
        torch.testing.assert_close(g, f, rtol=0, atol=0)
