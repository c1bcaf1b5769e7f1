"""The E-step benchmark's harness on the CPU: table, JSON, skips, and the IBM anchors' conventions."""
import json

import pytest
import torch
from flashgmm_ivf.eval import bench_estep

# Stand-ins for IBM Flash-GMM's entry points (same signatures and outputs, float64 torch), so
# the harness's conversion of our float64 oracle to their convention is checked on the CPU.
FAKE_ANCHOR = '''
import math

import torch


def _estep(X, mu, log_sigma_sq, log_pi, per_feature):
    x, mu, var = X.double(), mu.double(), log_sigma_sq.double().exp()
    var = var if var.dim() == 2 else var[:, None].expand_as(mu)
    sq = (x[:, None, :] - mu[None]) ** 2
    ll = log_pi.double() - 0.5 * (x.shape[1] * math.log(2 * math.pi) + var.log().sum(1)) - 0.5 * (sq / var).sum(2)
    log_z = torch.logsumexp(ll, 1)
    r = (ll - log_z[:, None]).exp()
    sig = torch.einsum("nk,nkd->kd", r, sq)
    return log_z, r.sum(0), r.T @ x, sig if per_feature else sig.sum(1)


def flash_gmm_estep_diag(X, mu, log_sigma_sq, log_pi):
    return _estep(X, mu, log_sigma_sq, log_pi, True)


def flash_gmm_estep(X, mu, log_sigma_sq, log_pi, BLOCK_N=64, BLOCK_K=16, BLOCK_D=128):
    assert X.shape[1] <= BLOCK_D
    return _estep(X, mu, log_sigma_sq, log_pi, False)
'''


@pytest.fixture(scope="module")
def anchor_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    for name in ("flash_gmm.py", "flash_gmm_h100.py", "flash_gmm_diag_h100.py"):
        (folder / name).write_text(FAKE_ANCHOR)
    return folder


@pytest.fixture(scope="module")
def run(anchor_dir):
    folder = anchor_dir
    out = folder / "bench.json"
    bench_estep.main(["--device", "cpu", "--n", "600", "--k", "8,32", "--d", "6", "--precisions", "",
                      "--window-s", "0.01", "--ceiling-size", "64", "--anchor-dir", str(folder),
                      "--oracle-max-flop", "5e5",
                      "--out", str(out)])
    return json.loads(out.read_text())


def test_json_has_environment_ceilings_and_every_row(run):
    assert run["environment"]["commit"] and run["environment"]["torch"] == torch.__version__
    assert set(run["matmul_ceilings_tflops"]) == {"bf16", "tf32", "fp32"}
    assert run["energy_method"] is None  # CPU: no NVML
    methods = {(r["covariance_type"], r["k"], r["method"]) for r in run["rows"]}
    for k in (8, 32):
        assert {("diag", k, "torch chunked TF32"), ("diag", k, "IBM Flash-GMM H100 (diag, bf16)"),
                ("spherical", k, "IBM Flash-GMM portable (isotropic)"),
                ("spherical", k, "torch materialised N x K")} <= methods


def test_rows_carry_time_throughput_and_accuracy(run):
    for row in run["rows"]:
        assert row["status"] == "ok", row
        assert row["ms_per_iteration"] > 0 and row["tflops"] > 0 and row["repeats"] >= 1
        assert row["fraction_of_ceiling"] > 0 and row["joules_per_iteration"] is None
        errors = row["relative_error"]
        if row["k"] * 6 * 600 * bench_estep.FLOP_PER_NKD[row["covariance_type"]] > 5e5:
            assert errors is None and row["oracle"].startswith("skipped")
        else:
            # float32 torch, or the float64 stand-ins for IBM's kernels fed float32 means.
            assert max(errors.values()) < 1e-4, row


def test_methods_predicted_too_slow_are_skipped(tmp_path):
    out = tmp_path / "b.json"
    bench_estep.main(["--n", "400,800", "--k", "8", "--d", "4", "--covariance-types", "spherical",
                      "--precisions", "", "--window-s", "0", "--ceiling-size", "32", "--max-method-s", "1e-9",
                      "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "skipped"]
    assert "--max-method-s" in rows[-1]["reason"]


def test_exact_on_candidates_row_is_timed_and_checked(tmp_path):
    out = tmp_path / "b.json"
    bench_estep.main(["--device", "cpu", "--n", "300", "--k", "8", "--d", "4", "--covariance-types", "diag",
                      "--precisions", "candidates", "--window-s", "0", "--ceiling-size", "32", "--out", str(out)])
    ours = [r for r in json.loads(out.read_text())["rows"] if r["method"].startswith("ours")]
    assert [r["status"] for r in ours] == ["ok"], ours
    assert max(ours[0]["relative_error"].values()) < 1e-4


def test_energy_meter_is_inert_on_cpu():
    meter = bench_estep.EnergyMeter(torch.device("cpu"))
    meter.start()
    assert meter.method is None and meter.stop() is None


# ---------------------------------------------------------------- the three GPU scripts, tiny
@pytest.mark.gpu
def test_bench_estep_on_gpu(tmp_path):
    out = tmp_path / "b.json"
    bench_estep.main(["--n", "20000", "--k", "64", "--d", "32", "--precisions", "bf16x3,ieee,candidates", "--uint8",
                      "--window-s", "0.3", "--ceiling-size", "2048", "--memory-n", "200000", "--out", str(out)])
    run = json.loads(out.read_text())
    assert all(r["status"] == "ok" for r in run["rows"]), run["rows"]
    ours = [r for r in run["rows"] if r["method"].startswith("ours")]
    assert len(ours) == 8 and all(r["peak_mib_above_input"] >= 0 for r in ours)
    assert all(r["relative_error"]["nk"] < 1e-3 for r in ours)
    assert run["memory_at_scale"]["n"] == 200000
    if run["energy_method"]:
        # None where the driver's energy counter did not move within a method's window.
        joules = [r["joules_per_iteration"] for r in ours]
        assert any(j is not None for j in joules) and all(j is None or j > 0 for j in joules), joules


@pytest.mark.gpu
def test_check_em_accuracy_on_gpu(tmp_path):
    from flashgmm_ivf.eval import check_em_accuracy
    out = tmp_path / "a.json"
    check_em_accuracy.main(["--n", "20000", "--n-test", "2000", "--k", "16", "--d", "24", "--iterations", "5",
                            "--precisions", "bf16x3,ieee", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 3 and all(r["met"] for r in rows if "met" in r)


@pytest.mark.gpu
def test_bench_outofcore_on_gpu(tmp_path):
    from flashgmm_ivf.eval import bench_outofcore
    out = tmp_path / "o.json"
    args = ["--path", str(tmp_path / "x.u8bin"), "--n", "300000", "--k", "64", "--iterations", "2",
            "--chunk-size", "65536", "--in-memory-n", "100000", "--out", str(out)]
    bench_outofcore.main(args)
    first = json.loads(out.read_text())
    assert first["n"] == 300000 and first["file"]["created_seconds"] is not None
    assert first["targets"]["peak_gpu_memory_under_4gb"]
    bench_outofcore.main(args + ["--cold"])
    assert json.loads(out.read_text())["file"]["created_seconds"] is None  # reused


@pytest.mark.gpu
def test_bench_fit_profiles_the_gpu(tmp_path):
    from flashgmm_ivf.eval import bench_fit
    out = tmp_path / "fit.json"
    bench_fit.main(["--n", "20000", "--k", "16", "--d", "32", "--iterations", "2", "--repeats", "1", "--device", "cuda",
                    "--cells", "diag:candidates", "--profile", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["gpu_busy_ms"] > 0 and 0 < len(row["kernels"]) <= 12
    ms = [kernel["ms"] for kernel in row["kernels"]]
    assert ms == sorted(ms, reverse=True) and ms[-1] >= 0
    # The busiest kernels of a tiny cell vary; the E-step's own always rank among its twelve.
    assert {"candidates_kernel", "candidate_resp_kernel", "piece_stats_kernel"} & {k["name"] for k in row["kernels"]}


def test_bench_fit_times_the_anchors_on_the_same_rows(tmp_path, anchor_dir):
    from flashgmm_ivf.eval import bench_fit
    out = tmp_path / "fit.json"
    bench_fit.main(["--n", "600", "--k", "4", "--d", "8", "--iterations", "2", "--repeats", "1", "--device", "cpu",
                    "--cells", "diag:candidates,spherical:candidates,diag:bf16", "--anchor-dir", str(anchor_dir),
                    "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["covariance_type"], r["precision"]) for r in rows] == [
        ("diag", "candidates"), ("spherical", "candidates"), ("diag", "bf16"),
        ("diag", "IBM Flash-GMM H100 (diag, bf16)"), ("spherical", "IBM Flash-GMM portable (isotropic)"),
        ("spherical", "IBM Flash-GMM H100 (isotropic, bf16)")]
    for r in rows:  # ours: one per repeat; the anchors': one per iteration
        anchor = r["precision"].startswith("IBM")
        assert len(r["ms_all"]) == (2 if anchor else 1) and r["n"] == 600, r
        assert r["ms_per_iteration"] > 0, r


def test_bench_fit_times_the_estimator(tmp_path):
    from flashgmm_ivf.eval import bench_fit
    out = tmp_path / "fit.json"
    bench_fit.main(["--n", "600", "--k", "4", "--d", "8", "--iterations", "2", "--repeats", "2", "--device", "cpu",
                    "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["environment"]["commit"] and doc["arguments"]["iterations"] == 2
    assert [(r["covariance_type"], r["precision"]) for r in doc["rows"]] == list(bench_fit.CELLS)
    for r in doc["rows"]:
        assert len(r["ms_all"]) == 2 and 0 < min(r["ms_all"]) <= r["ms_per_iteration"] <= max(r["ms_all"])
        assert r["dtype"] == "float32" and not r["standardised"]
    bench_fit.main(["--n", "600", "--k", "4", "--d", "8", "--iterations", "2", "--repeats", "1", "--device", "cpu",
                    "--cells", "diag:auto", "--standardise", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["precision"] == "auto" and row["standardised"]
    bench_fit.main(["--n", "600", "--k", "4", "--d", "8", "--iterations", "2", "--repeats", "1", "--device", "cpu",
                    "--cells", "spherical:candidates", "--dtype", "uint8", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["covariance_type"] == "spherical" and row["precision"] == "candidates" and "gpu_busy_ms" not in row
    assert row["dtype"] == "uint8"
    for bad in (["--cells", "diag"], ["--device", "cpu", "--profile"], ["--dtype", "float16"],
                ["--device", "cpu", "--dtype", "uint8", "--standardise"]):
        with pytest.raises(SystemExit):
            bench_fit.main(bad + ["--out", str(out)])


def test_candidate_sweep_times_every_config_and_refuses_one_whose_marks_differ(monkeypatch):
    from flashgmm_ivf import kernels
    from flashgmm_ivf.eval import tune_estep

    monkeypatch.setitem(tune_estep.SPACES, "candidate pass",
                        {"block_n": (64, 128), "block_k": (32,), "num_warps": (4,), "num_stages": (2,)})
    gen = torch.Generator().manual_seed(0)
    x = bench_estep.raw_scale_rows(200, 24, 256, gen, "cpu")
    weights, means, var, shift = bench_estep.starting_params(x, 64, "diag", gen)
    natural = kernels.natural_params(weights, means, var)
    (ms, best), rows = tune_estep.sweep_candidates(x, natural, shift.float(), "diag")
    assert [row["config"]["block_n"] for row in rows] == [64, 128]
    assert ms == min(row["ms"] for row in rows) and best.block_n in (64, 128)

    search = tune_estep.candidate_search

    def wrong_for_small_tiles(x, shift, weights, search_w, configs):
        run = search(x, shift, weights, search_w, configs)
        return run if configs[0].block_n != 64 else lambda *a: run(*a) ^ 1
    monkeypatch.setattr(tune_estep, "candidate_search", wrong_for_small_tiles)
    with pytest.raises(AssertionError, match="unlike the default's"):
        tune_estep.sweep_candidates(x, natural, shift.float(), "diag")
