"""The IVF build benchmark's harness: every row measured in the same run, minima, ratios, JSON."""
import json
import warnings

import faiss
import numpy as np
import pytest
import torch
from flashgmm_ivf.datasets import bundled_dataset, exact_knn, write_ann_hdf5
from flashgmm_ivf.eval import bench_ivf_train


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    base, test, _ = bundled_dataset()
    base, test = base[:3000].astype(np.float32), test[:20].astype(np.float32)
    folder = tmp_path_factory.mktemp("data")
    write_ann_hdf5(folder / "tiny-sift.hdf5", train=base, test=test, neighbors=exact_knn(base, test, 10, "l2"),
                   distances=np.zeros((20, 10), np.float32), distance="euclidean")
    out = folder / "bench.json"
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bench_ivf_train.main(["--datasets", "tiny-sift", "--data-dir", str(folder), "--nlist", "16",
                                  "--repeats", "2", "--threads", "1", "--out", str(out)])
    finally:  # the benchmark sets process-wide thread counts
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    return json.loads(out.read_text())


def test_rows_are_the_minima_of_interleaved_runs(doc):
    assert [r["method"] for r in doc["rows"]] == ["FAISS IVF16,Flat", "FAISS IVF16,Flat niter 25",
                                                  "FAISS IVF16_HNSW32,Flat", "IVF16_GMM,Flat"]
    for row in doc["rows"]:
        assert row["n"] == 3000 and row["d"] == 128 and len(row["runs"]) == 2
        for key in ("train_s", "add_s", "total_s", "train_cpu_s", "add_cpu_s", "total_cpu_s"):
            assert row[key] == min(run[key] for run in row["runs"]) >= 0
        for run in row["runs"]:
            assert run["total_s"] == pytest.approx(run["train_s"] + run["add_s"])
    reference = doc["rows"][0]
    assert reference["ratio_to_faiss_default"] == 1.0 and reference["cpu_ratio_to_faiss_default"] == 1.0
    ours = doc["rows"][-1]
    assert ours["ratio_to_faiss_default"] == pytest.approx(ours["total_s"] / reference["total_s"])


def test_json_records_environment_threads_and_load(doc):
    assert doc["environment"]["commit"] and doc["environment"]["faiss"]
    assert doc["environment"]["faiss_omp_threads"] == 1 and doc["arguments"]["threads"] == 1
    assert doc["load"][0]["dataset"] == "tiny-sift" and len(doc["load"][0]["load_average_end"]) == 3
