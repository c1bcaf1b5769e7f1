"""The fused M-step and parameter kernels against the torch path (the interpreter on a CPU)."""
import pytest
import torch

from flashgmm_ivf import GaussianMixture, kernels
from flashgmm_ivf._mstep import EMState
from flashgmm_ivf.kernels.estep_params import float32_natural_params


def _stats(n, k, d, covariance_type, device, empty=(3, 7, 20)):
    """Statistics of soft assignments of raw-scale rows, with some components empty and one nearly so."""
    gen = torch.Generator().manual_seed(k * d)
    x = torch.rand(n, d, dtype=torch.float64, generator=gen) * 255
    shift = x.mean(0).float().double()
    r = torch.rand(n, k, dtype=torch.float64, generator=gen) ** 8
    r[:, [c for c in empty if c < k]] = 0
    r[:, k - 1] *= 1e-6
    r /= r.sum(1, keepdim=True)
    xc = x - shift
    s2 = r.T @ (xc * xc) if covariance_type == "diag" else r.T @ (xc * xc).sum(1)
    stats = kernels.EStepResult(None, r.sum(0), r.T @ xc, s2)
    return kernels.EStepResult(None, *(t.to(device) for t in stats[1:])), x.to(device), shift.to(device)


def _torch_m_step(stats, worst, shift, n, covariance_type, floor):
    gmm = GaussianMixture(stats.nk.shape[0], covariance_type=covariance_type, device="cpu", variance_floor=floor)
    gmm._truncation = None
    cpu = kernels.EStepResult(None, *(t.cpu() for t in stats[1:]))
    return gmm._m_step(cpu, worst.cpu(), EMState(None, None, None, None, shift.cpu()), n)


def _check_m_step(covariance_type, k, d, n_worst, floor, device, rtol=1e-14):
    n = 3000
    stats, x, shift = _stats(n, k, d, covariance_type, device)
    worst = x[:n_worst]
    want, want_count = _torch_m_step(stats, worst, shift, n, covariance_type, floor)
    *got, got_shift, got_count = kernels.m_step(stats, worst, shift, n, 1e-6, floor, True)
    assert int(got_count) == int(want_count) == min(n_worst, int((stats.nk < 1).sum()))
    for name, w, g in zip(("weights", "means", "covariances", "precisions_cholesky"), want, got):
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=0, msg=name)
    assert torch.equal(got_shift.cpu(), want.shift)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
@pytest.mark.parametrize("n_worst, floor", [(0, 0.0), (2, 0.0), (5, 1e-4), (5, 0.0)])
def test_m_step_equals_the_torch_path(covariance_type, n_worst, floor, poisoned_empty):
    _check_m_step(covariance_type, 37, 13, n_worst, floor, "cpu")


@pytest.mark.parametrize("k, d", [(1, 1), (70, 3), (5, 130)])
def test_m_step_odd_shapes(k, d, poisoned_empty):
    _check_m_step("diag", k, d, 2, 1e-4, "cpu")


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
@pytest.mark.parametrize("k, d", [(37, 13), (1, 1), (3, 70)])
def test_float32_natural_params_equal_the_torch_path(covariance_type, k, d, poisoned_empty):
    gen = torch.Generator().manual_seed(k + d)
    w = torch.rand(k, dtype=torch.float64, generator=gen)
    w /= w.sum()
    means = torch.randn(k, d, dtype=torch.float64, generator=gen) * 50
    shape = (k, d) if covariance_type == "diag" else (k,)
    var = torch.rand(shape, dtype=torch.float64, generator=gen) * 100 + 1e-3
    shift = torch.rand(d, dtype=torch.float64, generator=gen) * 200
    want = kernels.natural_params(w, means, var)._replace(centres=means + shift).to(dtype=torch.float32)
    got = float32_natural_params(w, means, var, shift)
    for name, a, b in zip(want._fields, want, got):
        # float64 round-off (libdevice's log, sums in other orders) rarely moves a float32 rounding.
        torch.testing.assert_close(b, a, rtol=2 ** -23, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_m_step_on_cuda_equals_the_torch_path(covariance_type):
    # The compiled kernels fuse multiplies and adds: round-off differs from the interpreter's numpy.
    _check_m_step(covariance_type, 300, 128, 5, 1e-4, "cuda", rtol=1e-12)
