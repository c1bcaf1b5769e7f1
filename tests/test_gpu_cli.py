"""Every CLI command on CUDA, and data-parallel EM on CUDA (torchrun, NCCL or gloo, 1 and 2 ranks).

Each command's CUDA result is checked against the Python API's fit on the same data. Two ranks
use NCCL where the machine has two GPUs; on one GPU they share it through gloo (the same
collectives, moved through the host), so the CUDA path of the data-parallel fit runs anyway.
"""
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from flashgmm_ivf import GaussianMixture
from flashgmm_ivf.cli import bundled_dataset, main as cli_main
from flashgmm_ivf.distributed import load_checkpoint

pytestmark = pytest.mark.gpu
K, MAX_ITER = 32, 6
TORCHRUN_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 runs never converge, by design
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(path of a .npy of 60,000 x 32 raw-scale uint8 rows, the rows)."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(20, 200, (40, 32))
    x = (centres[rng.integers(0, 40, 60000)] + rng.normal(0, 12, (60000, 32))).clip(0, 255).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("cli") / "x.npy"
    np.save(path, x)
    return path, x


@pytest.fixture(scope="module")
def api_fit(data):
    """The Python API's CUDA fit that the train command must reproduce."""
    return GaussianMixture(K, max_iter=MAX_ITER, tol=0.0, random_state=0, init_params="kmeans",
                           device="cuda").fit(data[1])


def _assert_same_fit(got, want, rtol):
    assert got.n_iter_ == want.n_iter_
    np.testing.assert_allclose(got.lower_bounds_, want.lower_bounds_, rtol=rtol)
    np.testing.assert_allclose(got.weights_, want.weights_, rtol=rtol)
    np.testing.assert_allclose(got.means_, want.means_, rtol=0, atol=rtol * np.abs(want.means_).max())
    np.testing.assert_allclose(got.covariances_, want.covariances_, rtol=rtol)


def _train_argv(data_path, tmp_path, *extra):
    return ["train", "--data", str(data_path), "-k", str(K), "--max-iter", str(MAX_ITER), "--tol", "0",
            "--device", "cuda", "--save", str(tmp_path / "gmm.npz"), "-v", "0", *extra]


def test_cli_fit_on_cuda(tmp_path, capsys):
    assert cli_main(["fit", "--device", "cuda", "-k", "16", "--max-iter", "5", "--tol", "0",
                     "--save", str(tmp_path / "gmm.npz"), "-v", "0"]) == 0
    out = capsys.readouterr().out
    assert "cuda" in out and "Triton kernels" in out
    base, _, _ = bundled_dataset()
    want = GaussianMixture(16, max_iter=5, tol=0.0, random_state=0, device="cuda").fit(base)
    _assert_same_fit(GaussianMixture.load(tmp_path / "gmm.npz"), want, rtol=1e-9)


def test_cli_sweep_on_cuda(tmp_path, monkeypatch):
    devices = []
    fit = GaussianMixture._fit
    monkeypatch.setattr(GaussianMixture, "_fit", lambda self, source: devices.append(self._device().type)
                        or fit(self, source))
    spec = "IVF16_GMM(partition=gmm,diag,iter=3,device=cuda),Flat"
    assert cli_main(["sweep", "--method", spec, "--nlist", "16", "--max-queries", "100", "--out", str(tmp_path),
                     "-q"]) == 0
    assert devices and set(devices) == {"cuda"}
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = [r for r in saved["rows"] if r["method"] == spec]
    assert rows
    for r in rows:
        assert r["copies_per_vector"] == pytest.approx(1.5, rel=0.1)
        assert 0 < r["recall_at_10"] <= 1
    # A partition of random lists would find a small share of the neighbours at the shallow depths.
    assert max(r["recall_at_10"] for r in rows) > 0.5


def test_cli_train_on_cuda_equals_api_fit(data, api_fit, tmp_path, capsys):
    assert cli_main(_train_argv(data[0], tmp_path, "--checkpoint", str(tmp_path / "c.npz"))) == 0
    assert f"{MAX_ITER} iterations" in capsys.readouterr().out
    _assert_same_fit(GaussianMixture.load(tmp_path / "gmm.npz"), api_fit, rtol=1e-9)
    assert load_checkpoint(tmp_path / "c.npz").n_iter == MAX_ITER


def _torchrun(nproc, argv, cwd):
    """``torchrun --nproc-per-node=nproc -m flashgmm_ivf.cli argv`` in a fresh process; returns its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "flashgmm_ivf.cli", *argv]
    # Out of the repository root: there the source folder would shadow an installed wheel.
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, check=False,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_train_distributed_one_rank_nccl(data, api_fit, tmp_path):
    out = _torchrun(1, _train_argv(data[0], tmp_path, "--distributed", "--backend", "nccl"), tmp_path)
    assert "on 1 rank(s)" in out and f"{MAX_ITER} iterations" in out
    _assert_same_fit(GaussianMixture.load(tmp_path / "gmm.npz"), api_fit, rtol=1e-9)


def test_train_distributed_two_ranks_equals_single_gpu(data, tmp_path, monkeypatch):
    """Two ranks: NCCL on two GPUs, else gloo on one. Each rank's E-step runs over its 30,000
    rows as one block of its own copy, which it groups by best component, as the single-GPU
    reference runs over two such blocks of its own copy: the float32 partial sums are the same,
    only the order of the float64 additions differs. (Over other blocks or orders, float32 sums
    of other row groups differ by ~1e-7 relative, and EM carries that on.)"""
    from flashgmm_ivf import mixture
    half = len(data[1]) // 2
    monkeypatch.setattr(mixture, "CACHED_KERNEL_BLOCK", 1)  # the copy read in blocks of chunk_size rows
    want = GaussianMixture(K, max_iter=MAX_ITER, tol=0.0, random_state=0, init_params="kmeans", device="cuda",
                           chunk_size=half).fit(data[1])
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    argv = _train_argv(data[0], tmp_path, "--distributed", "--backend", backend, "--chunk-size", str(half),
                       "--checkpoint", str(tmp_path / "c.npz"))
    out = _torchrun(2, argv, tmp_path)
    assert "on 2 rank(s)" in out and f"{MAX_ITER} iterations" in out
    _assert_same_fit(GaussianMixture.load(tmp_path / "gmm.npz"), want, rtol=1e-9)
    assert load_checkpoint(tmp_path / "c.npz").n_iter == MAX_ITER
    # --resume from the finished checkpoint: no iteration runs, the same model comes back.
    (tmp_path / "gmm.npz").rename(tmp_path / "first.npz")
    _torchrun(2, argv + ["--resume"], tmp_path)
    _assert_same_fit(GaussianMixture.load(tmp_path / "gmm.npz"), GaussianMixture.load(tmp_path / "first.npz"),
                     rtol=0)


def test_bench_distributed_on_cuda(tmp_path):
    from flashgmm_ivf.eval import bench_distributed
    out = tmp_path / "d.json"
    bench_distributed.main(["--n", "300000", "--k", "64", "--iterations", "3", "--block-rows", "65536",
                            "--worlds", "1,2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["backend"]) for r in rows] == [
        (1, "none"), (1, "nccl"), (2, "nccl" if torch.cuda.device_count() >= 2 else "gloo")]
    assert all(r["equal_to_single"] for r in rows), rows
    assert all(r["n_iter"] == 4 and math.isfinite(r["seconds_per_iteration"] + r["fixed_seconds"]) for r in rows)
