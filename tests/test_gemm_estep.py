"""The bf16x3 E-step by library products (``kernels.gemm``) against the float64 torch reference.

On the CPU its bfloat16 pieces are held in float32 and multiplied in float32, the arithmetic
a GPU's bf16 GEMMs with float32 accumulation run; on a GPU the same tests run through cuBLAS.
Several blocks of rows per call, shapes not multiples of anything.
"""
import pytest
import torch

from flashgmm_ivf import kernels
from flashgmm_ivf.kernels import gemm
from flashgmm_ivf.kernels.params import kernel_weights, split_offset
from test_kernels import make_rows, random_mixture, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 1), (37, 5, 3), (203, 37, 19), (530, 129, 70), (145, 1030, 5)]


def gemm_estep(x, params, shift, rows):
    params, offset = split_offset(params.to(DEVICE, torch.float32))
    weights = kernel_weights(params, "bf16x3", DEVICE)
    result = gemm.estep(x.to(DEVICE), shift.to(DEVICE, torch.float32), weights, rows=rows)
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


def test_block_rows_bounds_memory_and_float32_sums():
    assert gemm.block_rows(1024, 960) <= gemm.MAX_BLOCK_ROWS
    assert gemm.block_rows(1 << 20, 4096) == 256  # never fewer rows than a useful product
    per_row = 8 * 1024 + 8 * (2 * 960 + 1)
    assert gemm.block_rows(1024, 960, budget=1000 * per_row) == 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "spherical"])
def test_wide_rows_take_library_products_on_a_gpu(diagonal):
    """kernels.estep at D >= GEMM_FROM_FEATURES without launch settings is kernels.gemm's E-step."""
    from flashgmm_ivf.kernels.estep import GEMM_FROM_FEATURES
    gen = torch.Generator().manual_seed(7)
    x = make_rows(1000, GEMM_FROM_FEATURES + 3, "raw", gen)
    params, shift = random_mixture(x, 17, diagonal, gen)
    got = kernels.estep(x.cuda(), params.to("cuda"), shift.cuda())
    want = gemm_estep(x, params, shift, rows=None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)
