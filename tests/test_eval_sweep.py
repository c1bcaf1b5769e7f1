"""The recall sweep: cost interpolation, summary ratios, tuning, files written, the CLI subcommand.

Data: 2,000 rows of the real SIFT sample bundled with the package, written by the test as
an ann-benchmarks HDF5 file, so the registry path (load_dataset) is exercised too.
"""
import csv
import json
import math
import warnings

import numpy as np
import pytest

from flashgmm_ivf.cli import bundled_dataset, main as cli_main
from flashgmm_ivf.datasets import exact_knn, write_ann_hdf5
from flashgmm_ivf.eval import sweep

COLUMNS = {"dataset", "method", "partition", "rule", "probe", "params", "copies_target", "copies_per_vector",
           "index_bytes", "train_s", "add_s", "nprobe", "knob", "recall_at_1", "recall_at_10", "recall_at_100", "ndis_per_query",
           "coarse_per_query", "dist_per_query", "qps", "n_base", "n_queries", "nlist"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    base, test, _ = bundled_dataset()
    base, test = base[:2000].astype(np.float32), test[:50].astype(np.float32)
    gt = exact_knn(base, test, 100, "l2")
    folder = tmp_path_factory.mktemp("data")
    write_ann_hdf5(folder / "tiny-sift.hdf5", train=base, test=test, neighbors=gt,
                   distances=np.zeros(gt.shape, np.float32), distance="euclidean")
    return folder


def curve(*points):
    return [{"dist_per_query": c, "recall_at_10": r} for c, r in points]


def test_cost_at_interpolates_in_log_cost():
    c = curve((100, 0.7), (200, 0.9), (400, 0.97))
    assert sweep.cost_at(c, 0.8) == pytest.approx(math.sqrt(100 * 200))  # halfway in log space
    assert sweep.cost_at(c, 0.9) == pytest.approx(200)
    assert sweep.cost_at(c, 0.95) == pytest.approx(200 * 2 ** (0.05 / 0.07))
    assert sweep.cost_at(c, 0.5) == 100       # met at the first point: nothing cheaper measured
    assert sweep.cost_at(c, 0.99) is None     # never reached


def test_summary_ratio_is_to_the_cheapest_kmeans_at_the_same_budget():
    def rows(method, partition, copies, points):
        return [{"method": method, "partition": partition, "copies_target": copies, "copies_per_vector": copies,
                 **p} for p in curve(*points)]
    data = (rows("kmeans-niter25", "kmeans-niter25", 1.0, [(100, 0.85), (200, 0.95)])
            + rows("gmm-diag", "gmm-diag", 1.0, [(150, 0.85), (300, 0.95)])
            + rows("kmeans+soar", "kmeans-niter25", 2.0, [(120, 0.85), (180, 0.95)])
            + rows("kmeans+top2", "kmeans-niter25", 2.0, [(110, 0.85), (300, 0.95)])
            + rows("gmm-diag", "gmm-diag", 2.0, [(100, 0.85), (200, 0.95)]))
    summary = {(s["method"], s["copies_target"]): s for s in sweep.summarize(data, targets=(0.8, 0.85, 0.95))}
    assert summary[("gmm-diag", 1.0)]["ratio_to_kmeans"]["0.95"] == pytest.approx(1.5)
    assert summary[("kmeans-niter25", 1.0)]["ratio_to_kmeans"]["0.85"] == 1.0
    # at 2 copies the reference is top2 at 0.85 (110) and soar at 0.95 (180)
    assert summary[("gmm-diag", 2.0)]["ratio_to_kmeans"]["0.85"] == pytest.approx(100 / 110)
    assert summary[("gmm-diag", 2.0)]["reference"]["0.95"] == "kmeans+soar"
    assert summary[("gmm-diag", 2.0)]["ratio_to_kmeans"]["0.95"] == pytest.approx(200 / 180)
    table = sweep.markdown(sweep.summarize(data), "t")
    assert "| gmm-diag | 2.00 |" in table


def test_methods_parse_and_budgets():
    methods = sweep.parse_methods("kmeans,kmeans-niter10,gmm+soar,gmm-spherical")
    assert [m.name for m in methods] == ["kmeans-niter25", "kmeans-niter10", "gmm+soar", "gmm-spherical"]
    copies = (1.0, 1.3, 2.0)
    assert [m.budgets(copies) for m in methods] == [(1.0,), (1.0,), (1.3, 2.0), copies]
    with pytest.raises(ValueError, match="unknown spill rule"):
        sweep.parse_methods("kmeans+nope")
    with pytest.raises(ValueError, match="unknown partition"):
        sweep.parse_methods("pq+soar")
    with pytest.raises(ValueError, match="posterior"):
        sweep.parse_methods("kmeans@posterior")
    assert sweep.parse_methods("gmm+soar@posterior")[0].probe == "posterior"
    graph = sweep.parse_methods("kmeans+soar@adaptive/hnsw,kmeans/hnsw")
    assert [(m.quantizer, m.probe, m.name) for m in graph] == [
        ("hnsw", "adaptive", "kmeans+soar@adaptive/hnsw"), ("hnsw", "centroid", "kmeans-niter25/hnsw")]
    preset = sweep.parse_methods("hnsw")
    assert {m.quantizer for m in preset} == {"flat", "hnsw"} and preset[0].name == "kmeans-niter25"
    with pytest.raises(ValueError, match="unknown quantizer"):
        sweep.parse_methods("kmeans/ivf")
    with pytest.raises(ValueError, match="scores all K"):
        sweep.parse_methods("gmm-spherical@gap/hnsw")


def test_sweep_writes_csv_json_png(tiny_dir, tmp_path):
    doc = sweep.run("tiny-sift", data_dir=tiny_dir, nlist=16, methods="kmeans-niter10,kmeans+spann,gmm-diag",
                    copies=[1.0, 1.5], out=tmp_path, gmm_iter=3, quiet=True)
    stem = tmp_path / "sweep_tiny-sift"
    for ext in ("csv", "json", "png", "md"):
        assert (stem.with_suffix(f".{ext}")).stat().st_size > 0
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == COLUMNS
    assert {(r["method"], float(r["copies_target"])) for r in rows} == {
        ("kmeans-niter10", 1.0), ("kmeans+spann", 1.5), ("gmm-diag", 1.0), ("gmm-diag", 1.5)}
    for r in rows:
        assert float(r["copies_per_vector"]) == pytest.approx(float(r["copies_target"]))
        assert float(r["dist_per_query"]) == pytest.approx(float(r["ndis_per_query"]) + 16)
        assert 0 <= float(r["recall_at_100"]) <= 1
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert {"environment", "config", "dataset", "tuning", "rows", "summary"} <= set(saved)
    assert {"numpy", "faiss", "torch", "device", "commit"} <= set(saved["environment"])
    assert saved["config"]["nprobe"] == [1, 2, 4]
    assert len(doc["summary"]) == 4
    # copies 1.5 at nprobe = nlist/4 scans more codes than hard k-means
    last = {(r["method"], r["copies_target"]): r for r in doc["rows"] if r["nprobe"] == 4}
    if ("kmeans-niter10", 1.0) in last and ("kmeans+spann", 1.5) in last:
        assert last[("kmeans+spann", 1.5)]["ndis_per_query"] > last[("kmeans-niter10", 1.0)]["ndis_per_query"]


def test_exact_at_full_probe_with_duplicates(tiny_dir):
    data = sweep.load_data("tiny-sift", data_dir=tiny_dir, max_queries=20)
    part = sweep.train_partition("kmeans-niter10", data.base, 8)
    lists, params = sweep.method_lists(sweep.Method("kmeans-niter10", "spann"), part, data.base, 2.0)
    index = sweep.build_index(part.centroids, data.base, lists)
    assert index.ntotal == 2 * len(data.base) and params["eps"] > 0
    (point,) = sweep.sweep_nprobe(index, data.test, data.gt, [8], lists.shape[1])
    assert point["recall_at_100"] == 1.0 and point["recall_at_1"] == 1.0


def test_tune_lambda_on_learn_queries(tiny_dir):
    data = sweep.load_data("tiny-sift", data_dir=tiny_dir, max_queries=30)
    # queries stand in for learn ones here (the HDF5 format has no learn split)
    data.learn, data.gt_learn = data.test, data.gt[:, :10]
    part = sweep.train_partition("kmeans-niter10", data.base, 8)
    lam, record = sweep.tune_lambda(sweep.Method("kmeans-niter10", "rair"), part, data, 2.0, [1, 2, 4, 8])
    assert lam in sweep.LAMBDA_GRID["rair"]
    assert [g["lam"] for g in record["grid"]] == list(sweep.LAMBDA_GRID["rair"])
    assert record["chosen_lam"] == lam


def test_cli_sweep(tiny_dir, tmp_path):
    assert cli_main(["sweep", "--dataset", "tiny-sift", "--data-dir", str(tiny_dir), "--nlist", "8",
                     "--methods", "kmeans,gmm-spherical+top2@posterior", "--copies", "1,1.3", "--nprobe", "1,2",
                     "--gmm-iter", "2", "--max-queries", "20", "--out", str(tmp_path), "-q"]) == 0
    saved = json.loads((tmp_path / "sweep_tiny-sift.json").read_text())
    assert saved["config"]["nprobe"] == [1, 2] and saved["dataset"]["n_test"] == 20
    assert {r["method"] for r in saved["rows"]} == {"kmeans-niter25", "gmm-spherical+top2@posterior"}
    # posterior probing is charged nprobe true distances on top of the K coarse evaluations
    for r in saved["rows"]:
        assert r["coarse_per_query"] == 8 + (r["nprobe"] if r["method"].endswith("@posterior") else 0)


def test_summarize_sweeps_picks_the_cheapest_gmm_within_the_copies(tmp_path):
    from flashgmm_ivf.eval import summarize_sweeps

    def entry(method, partition, probe, copies, cost, spill=None):
        return {"method": method, "partition": partition, "probe": probe, "copies_target": copies,
                "copies_per_vector": copies, "cost_at": {"0.9": cost, "0.95": None}, "qps_at": {"0.9": 10.0,
                "0.95": None}, "index_bytes": 2e6, "ratio_to_spill": {"0.9": spill, "0.95": None}}
    doc = {"dataset": {"name": "toy"}, "config": {"nlist": 64}, "summary": [
        entry("kmeans-niter25", "kmeans-niter25", "centroid", 1.0, 1200.0),
        entry("kmeans+soar@radius", "kmeans-niter25", "radius", 1.5, 900.0),
        entry("gmm-spherical@adaptive", "gmm-spherical", "adaptive", 1.5, 1000.0, 0.8),
        entry("gmm-spherical@radius", "gmm-spherical", "radius", 1.5, 800.0, 0.5),
        entry("gmm-spherical+soar@radius", "gmm-spherical", "radius", 2.0, 400.0)]}  # over the copies cap
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    r09, r095 = summarize_sweeps.summary_rows(doc)
    assert (r09["gmm"], r09["gmm_factor"], r09["vs_spill"]) == ("gmm-spherical@radius", 1.5, 2.0)
    assert (r09["gmm_adaptive"], r09["kmeans"], r09["kmeans_factor"]) == (1.2, "kmeans+soar@radius", 1200 / 900)
    assert r095["gmm"] is None and r095["ivf"] is None
    out = tmp_path / "t.md"
    assert summarize_sweeps.main([str(path), "--out", str(out)]) == 0
    table = out.read_text()
    assert "| toy (64) | 0.9 | 1,200 | gmm-spherical@radius | 800 | **1.50** | 2.00 | 1.20 | 1.50 |" in table
    doc["summary"] = doc["summary"][1:]
    with pytest.raises(ValueError, match="yardstick"):
        summarize_sweeps.summary_rows(doc)
