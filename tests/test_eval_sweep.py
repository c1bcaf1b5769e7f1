"""The recall sweep (eval.methods / runner / report): cost accounting, fronts and ratios, files, the CLI command.

Data: 2,000 rows of the real SIFT sample bundled with the package, written by the test as
an ann-benchmarks HDF5 file, so the registry path (load_dataset) is exercised too.
"""
import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
from flashgmm_ivf.datasets import bundled_dataset, exact_knn, write_ann_hdf5
from flashgmm_ivf.eval import methods, report, runner

from flashgmm_ivf.cli import main as cli_main

NLIST = 16
SPEC = "IVF{nlist}_GMM(diag,iter=3),Flat"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def sift():
    base, test, _ = bundled_dataset()
    base, test = base[:2000].astype(np.float32), test[:50].astype(np.float32)
    return base, test, exact_knn(base, test, 100, "l2")


@pytest.fixture(scope="module")
def tiny_dir(sift, tmp_path_factory):
    base, test, gt = sift
    folder = tmp_path_factory.mktemp("data")
    write_ann_hdf5(folder / "tiny-sift.hdf5", train=base, test=test, neighbors=gt,
                   distances=np.zeros(gt.shape, np.float32), distance="euclidean")
    return folder


def curve(*points):
    return [{"dist_per_query": c, "recall_at_10": r} for c, r in points]


def test_cost_at_interpolates_in_log_cost_on_the_front():
    c = report.front(curve((400, 0.97), (100, 0.7), (250, 0.6), (200, 0.9)))
    assert [p["dist_per_query"] for p in c] == [100, 200, 400]  # (250, 0.6) is dominated
    assert report.cost_at(c, 0.8) == pytest.approx(math.sqrt(100 * 200))  # halfway in log space
    assert report.cost_at(c, 0.9) == pytest.approx(200)
    assert report.cost_at(c, 0.95) == pytest.approx(200 * 2 ** (0.05 / 0.07))
    assert report.cost_at(c, 0.5) == 100       # met at the first point: nothing cheaper measured
    assert report.cost_at(c, 0.99) is None     # never reached


def rows(method, yardstick, points, copies=1.0, qps=1000.0, targets=None):
    return [{"method": method, "yardstick": yardstick, "copies_per_vector": copies, "index_bytes": 10**6,
             "build_s": 1.0, "qps": qps, "recall_target": None if targets is None else targets[i], **p}
            for i, p in enumerate(curve(*points))]


def test_summary_ratio_is_yardstick_over_ours():
    data = (rows("ivf", "ivf", [(100, 0.85), (300, 0.95)]) + rows("hnsw", "ivf-hnsw", [(80, 0.85), (200, 0.95)])
            + rows("ours", "", [(50, 0.85), (100, 0.95)], copies=1.3, targets=[0.9, 0.95]))
    summary = {s["method"]: s for s in report.summarize(data, targets=(0.85, 0.95))}
    assert summary["ours"]["x_fewer"]["ivf"]["0.95"] == pytest.approx(3.0)
    assert summary["ours"]["x_fewer"]["ivf-hnsw"]["0.85"] == pytest.approx(1.6)
    assert summary["ivf"]["x_fewer"]["ivf"]["0.85"] == 1.0
    assert summary["ours"]["recall_when_asked"] == {"0.85": None, "0.95": 0.95}
    table = report.markdown(list(summary.values()), "t", targets=(0.85, 0.95))
    assert "| ours | 50 | 100 | 2.00 | 3.00 | 1.60 | 2.00 | 1.30 | 1.0 |" in table


def test_summary_table_marks_hits_and_misses():
    data = (rows("ivf", "ivf", [(100, 0.85), (300, 0.95)], qps=500.0)
            + rows("hnsw", "ivf-hnsw", [(60, 0.85), (200, 0.95)])
            + rows("ours", "", [(50, 0.85), (100, 0.95)], copies=1.7, qps=400.0))
    doc = {"dataset": {"name": "toy"}, "config": {"nlist": 64}, "summary": report.summarize(data)}
    table = report.summary_table([doc])
    line = next(x for x in table.splitlines() if "| 0.95 | ours |" in x)
    assert "3.00 ✓" in line and "2.00 ✓" in line and "1.700 ✗ miss" in line
    line = next(x for x in table.splitlines() if "| 0.9 | ours |" in x)
    assert "2.45 ✓" in line and "1.55 ✓" in line and "400 (500) ✗ miss" in line
    with pytest.raises(ValueError, match="yardstick"):
        report.summary_table([{**doc, "summary": doc["summary"][1:]}])


@pytest.mark.parametrize("method", [methods.FaissIVF(NLIST), methods.FaissIVFHNSW(NLIST, ef_search=(16,))],
                         ids=["ivf", "ivf-hnsw"])
def test_faiss_yardsticks_exact_at_full_depth_and_counted(sift, method):
    base, test, gt = sift
    method.build(base, base)
    assert method.copies_per_vector() == 1.0 and method.index_bytes() > base.nbytes
    assert method.params()["kmeans_niter"] == 25
    depth = method.curves()[-1][-1]
    assert depth["nprobe"] == NLIST
    _, I = method.search(test, 100, **depth)
    assert runner.recall_at(I, gt, 100) == 1.0
    assert method.last_stats["ndis"] == len(base)  # every code scanned once
    if method.yardstick == "ivf":
        assert method.last_stats["ncoarse"] == NLIST
    else:  # the graph walk's own count: at nprobe = nlist it visits (about) every centroid
        assert NLIST // 2 <= method.last_stats["ncoarse"] <= NLIST


def test_gmm_index_through_the_public_api(sift):
    base, test, gt = sift
    method = methods.GMMIndex(SPEC, NLIST, knob="nprobe")
    assert method.name == "IVF16_GMM(diag,iter=3),Flat"
    with pytest.raises(ValueError, match="knob"):
        methods.GMMIndex(SPEC, NLIST, knob="auto")
    try:
        method.build(base, base)
        assert method.curves() == [[{"nprobe": p} for p in (1, 2, 3, 4, 6, 8, 12, 16)]]
        _, I = method.search(test, 100, nprobe=NLIST)
        assert runner.recall_at(I, gt, 100) == 1.0
        assert method.copies_per_vector() >= 1.0 and method.last_stats["ndis"] >= len(base)
        again = methods.GMMIndex(SPEC, NLIST, knob="nprobe", start_from=method)
        again.build(base, base)
        assert np.array_equal(again.search(test, 10, nprobe=2)[1], method.search(test, 10, nprobe=2)[1])
    finally:
        method.remove_files()
    assert method.path is None
    with pytest.raises(ValueError, match="learn queries"):
        methods.GMMIndex(SPEC, NLIST, calibrate="learn").build(base, base)


def test_learn_calibration_starts_from_the_built_index(sift):
    base, test, gt = sift
    first = methods.GMMIndex(SPEC, NLIST)
    learned = methods.GMMIndex(SPEC, NLIST, calibrate="learn", start_from=first)
    try:
        first.build(base, base)
        learned.build(base, base, learn=base[::20])  # 100 rows stand in for learn queries
        assert learned.copies_per_vector() == first.copies_per_vector()
        assert learned.params()["calibrate"] == "learn" and learned.params()["learn_queries"] == 100
        assert learned.name.endswith("+ calibrate(learn)")
        rows = runner.sweep(learned, test, gt)
        assert [r["recall_target"] for r in rows] == list(methods.RECALL_TARGETS[:len(rows)])
        assert rows[-1]["recall_at_10"] > rows[0]["recall_at_10"]
        assert all(r["dist_per_query"] == r["ndis_per_query"] + r["coarse_per_query"] for r in rows)
    finally:
        first.remove_files()
        learned.remove_files()


def test_nprobe_grid_has_the_midpoints():
    assert methods.nprobe_grid(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert methods.nprobe_grid(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert methods.nprobe_grid(1) == [1]


def test_make_methods_names_specs_and_learn():
    made = runner.make_methods(["ivf", "ivf-hnsw", "gmm+learn", "IVF{nlist}_GMM(spherical),Flat"], 32, "cache")
    assert [m.name for m in made] == ["FAISS IVF32,Flat", "FAISS IVF32_HNSW32,Flat", "IVF32_GMM,Flat",
                                      "IVF32_GMM,Flat + calibrate(learn)", "IVF32_GMM(spherical),Flat"]
    assert made[1].start_from is made[0] and made[3].start_from is made[2]
    assert str(made[0].cache) == "cache"
    with pytest.raises(ValueError, match="only our index"):
        runner.make_methods(["ivf+learn"], 32)
    assert runner.recommended_nlist(10_000) == 512 and runner.recommended_nlist(500_000) == 2048


def test_run_writes_csv_json_png_md(tiny_dir, tmp_path):
    # in two parts: the yardstick, then our index merged with it
    first = runner.run("tiny-sift", data_dir=tiny_dir, nlist=NLIST, methods=["ivf"], out=tmp_path / "a", quiet=True)
    with pytest.raises(ValueError, match="nlist"):
        runner.run("tiny-sift", data_dir=tiny_dir, nlist=8, methods=[SPEC], merge=first["files"][1], quiet=True)
    doc = runner.run("tiny-sift", data_dir=tiny_dir, nlist=NLIST, methods=[SPEC, SPEC + "+learn"],
                     merge=first["files"][1], out=tmp_path, quiet=True)
    assert [r["methods"] for r in doc["earlier_runs"]] == [["FAISS IVF16,Flat"]]
    again = runner.run("tiny-sift", data_dir=tiny_dir, nlist=NLIST, methods=["ivf"], merge=doc["files"][1],
                       out=tmp_path / "b", quiet=True)  # the yardstick measured again: the first run drops out
    assert [r["methods"] for r in again["earlier_runs"]] == [["IVF16_GMM(diag,iter=3),Flat"]]
    assert [s["method"] for s in again["summary"]] == ["FAISS IVF16,Flat", "IVF16_GMM(diag,iter=3),Flat"]
    stem = tmp_path / "sweep_tiny-sift"
    for ext in ("csv", "json", "png", "md"):
        assert stem.with_suffix(f".{ext}").stat().st_size > 0
    with open(stem.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    # no learn split in an HDF5 set: the '+learn' method is left out
    assert {r["method"] for r in table} == {"FAISS IVF16,Flat", "IVF16_GMM(diag,iter=3),Flat"}
    for r in table:
        assert float(r["dist_per_query"]) == pytest.approx(float(r["ndis_per_query"]) + float(r["coarse_per_query"]))
        assert 0 <= float(r["recall_at_100"]) <= 1 and float(r["qps"]) > 0
        assert json.loads(r["params"])
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert {"environment", "config", "dataset", "rows", "summary"} <= set(saved)
    assert {"numpy", "faiss", "torch", "commit"} <= set(saved["environment"])
    assert saved["config"]["nlist"] == NLIST and saved["dataset"]["n_test"] == 50
    assert [s["method"] for s in doc["summary"]] == ["FAISS IVF16,Flat", "IVF16_GMM(diag,iter=3),Flat"]
    assert "x fewer than FAISS IVF (flat)" in stem.with_suffix(".md").read_text()


def test_cli_sweep(tiny_dir, tmp_path):
    assert cli_main(["sweep", "--dataset", "tiny-sift", "--data-dir", str(tiny_dir), "--nlist", "8",
                     "--method", "ivf-hnsw", "--method", "IVF{nlist}_GMM(spherical,iter=2),Flat",
                     "--max-queries", "20", "--out", str(tmp_path), "-q"]) == 0
    saved = json.loads((tmp_path / "sweep_tiny-sift.json").read_text())
    assert saved["dataset"]["n_test"] == 20
    assert [s["method"] for s in saved["summary"]] == ["FAISS IVF8_HNSW32,Flat", "IVF8_GMM(spherical,iter=2),Flat"]


@pytest.mark.parametrize("argv, status, message", [
    (["fit", "--data", "{dir}/junk.npy"], 1, "junk.npy: not a readable .npy file"),
    (["fit", "--data", "{dir}/missing.npy"], 1, "No such file"),
    (["fit", "--data", "{dir}/nan.npy"], 1, "NaN or infinity; the first is row 0"),
    (["train", "--data", "{dir}/nan.npy", "-k", "0"], 1, "n_components must be an integer"),
    (["sweep", "--nlist", "-3"], 2, "--nlist: must be >= 1, got -3"),
])
def test_cli_ends_bad_input_with_its_message(tmp_path, capsys, argv, status, message):
    (tmp_path / "junk.npy").write_bytes(b"junk")
    np.save(tmp_path / "nan.npy", np.full((30, 4), np.nan, np.float32))
    with pytest.raises(SystemExit) as ended:
        cli_main([a.format(dir=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert ended.value.code == status and message in err and "Traceback" not in err


def test_inner_product_sweep_builds_every_method_by_inner_product(tiny_dir, tmp_path):
    data = runner.load_data("tiny-sift", data_dir=tiny_dir, max_queries=20, inner_product=True)
    assert data.metric == "ip"
    np.testing.assert_array_equal(data.gt[:, :10],
                                  faiss.knn(data.test, data.base, 10, metric=faiss.METRIC_INNER_PRODUCT)[1])
    assert runner.load_data(None, max_queries=5, inner_product=True).metric == "ip"  # the bundled sample too
    doc = runner.run("tiny-sift", data_dir=tiny_dir, nlist=8, methods=["ivf", "IVF{nlist}_GMM,Flat"],
                     max_queries=20, inner_product=True, out=tmp_path, quiet=True)
    assert "raw inner product" in doc["title"]
    made = runner.make_methods(["ivf", "ivf-hnsw", "gmm"], 8, metric="ip")
    assert made[0].metric == made[1].metric == faiss.METRIC_INNER_PRODUCT and made[2].options["metric"] == "ip"
    assert {r["method"] for r in doc["rows"]} == {"FAISS IVF8,Flat", "IVF8_GMM,Flat"}
    assert max(r["recall_at_10"] for r in doc["rows"]) > 0.95


def test_eval_does_not_import_the_cli(tmp_path):
    code = "import sys, flashgmm_ivf.eval.runner; print('flashgmm_ivf.cli' in sys.modules)"
    # Out of the repository root: there `python -c` would import the source folder, not the installed package.
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          check=True).stdout.strip() == "False"


def test_source_folder_imports_from_the_repository_root():
    """``python -m pytest`` or ``python -c`` in the repository root import the source folder ahead of an
    installed wheel: its subpackages (the top-level kernels/, datasets/ and eval/) are found there too."""
    root = Path(__file__).resolve().parents[1]
    code = ("import flashgmm_ivf, flashgmm_ivf.kernels, flashgmm_ivf.datasets, flashgmm_ivf.eval.runner; "
            "print(flashgmm_ivf.__file__); print(flashgmm_ivf.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    package, kernels = (Path(line) for line in out.stdout.split())
    assert package == root / "flashgmm_ivf" / "__init__.py" and kernels == root / "kernels" / "__init__.py"


def test_hnsw_yardstick_from_ivf_centroids_is_what_faiss_trains(sift):
    base, test, _ = sift
    ivf = methods.FaissIVF(NLIST)
    ivf.build(base, base)
    shared, alone = methods.FaissIVFHNSW(NLIST, start_from=ivf), methods.FaissIVFHNSW(NLIST)
    shared.build(base, base)
    alone.build(base, base)
    np.testing.assert_array_equal(shared.centroids, alone.centroids)
    assert shared.params()["kmeans_from"] == ivf.name and shared.build_s >= ivf.kmeans_s
    depth = {"nprobe": 4, "ef_search": 16}
    np.testing.assert_array_equal(shared.search(test, 10, **depth)[1], alone.search(test, 10, **depth)[1])


def test_ivf_cache_reuses_the_kmeans(sift, tmp_path):
    base, test, _ = sift
    first, again = methods.FaissIVF(NLIST, cache=tmp_path), methods.FaissIVF(NLIST, cache=tmp_path)
    first.build(base, base)
    assert len(list(tmp_path.glob("faiss-IVF16-niter25-seed1234-*.index"))) == 1
    again.build(base, base)
    np.testing.assert_array_equal(again.centroids, first.centroids)
    assert again.kmeans_s == pytest.approx(first.kmeans_s) and again.build_s >= first.kmeans_s
    other = methods.FaissIVF(NLIST, cache=tmp_path)
    other.build(base[:1500], base)  # other training rows: another entry
    assert len(list(tmp_path.glob("*.index"))) == 2


def test_synthetic_set_loads_through_the_registry_with_exact_neighbours(tmp_path):
    """eval.synthetic writes an ann-benchmarks file the runner opens by name, its neighbours exact."""
    from flashgmm_ivf.datasets import load_dataset
    from flashgmm_ivf.eval import synthetic

    synthetic.write_set("dups48-synth", tmp_path)
    ds = load_dataset("dups48-synth", data_dir=tmp_path)
    base, test = np.asarray(ds.base), np.asarray(ds.test)
    assert base.shape == (70_000, 48) and test.shape == (synthetic.QUERIES, 48)
    assert len(np.unique(base, axis=0)) < 0.8 * len(base)  # the duplicates are there
    d = ((test[:5, None, :].astype(np.float64) - base[None, :, :]) ** 2).sum(-1)
    gt = np.asarray(ds.gt)[:5, :10]
    np.testing.assert_allclose(np.take_along_axis(d, gt, 1), np.sort(d, 1)[:, :10], rtol=1e-6)


def test_check_coarse_choice_measures_every_candidate_and_the_rule_picks_the_cheapest_past_the_margin(tiny_dir):
    from flashgmm_ivf.eval import check_coarse_choice
    from flashgmm_ivf.ivf.calibration import LINK_MARGIN
    result = check_coarse_choice.check_set("tiny-sift", tiny_dir, n_queries=50)
    names = [row["coarse"] for row in result["rows"]]
    assert names == ["hnsw32", "hnsw16", "hnsw8", "pca32"] and result["queries"] == "test"
    assert result["rows"][0]["predicted_ratio"] == 1.0
    for row in result["rows"]:
        assert all(v > 0 for v in row["predicted"].values())
        assert len(row["curve"]) == len(check_coarse_choice.TARGETS)
        assert all(0 <= p["recall_at_10"] <= 1 and p["dist_per_query"] > 0 for p in row["curve"])
    # the default's choice is what the rule gives on these predictions
    passing = [row for row in result["rows"] if row["predicted_ratio"] <= 1 - LINK_MARGIN] or result["rows"][:1]
    assert result["chosen_by_default"] == min(passing, key=lambda row: row["score"])["coarse"]
