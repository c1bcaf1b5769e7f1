"""The coarse-step choice: each candidate's cost predicted on the calibration queries against its cost on real queries.

On one data set, the default index (``IVF<nlist>_GMM,Flat``, nlist the power of two nearest
4 sqrt(n)) is trained and filled; then every coarse step ``coarse='auto'`` weighs replaces the
quantizer in turn (:func:`flashgmm_ivf.ivf.calibration.try_coarse_steps`, the trials the default's
choice compares):

* predicted: the depth table's expected distance computations per query on the
  ``LINK_QUERIES`` calibration queries (held-out training rows) at each of ``LINK_RECALLS``,
  and their geometric mean (the score the choice compares);
* measured: the table refitted on all calibration queries, then ``search(q, 10, recall=r)``
  over a grid of targets on held-out queries (the set's learn queries, or its test queries
  where it has none), distance computations per query at measured recall@10 = 0.9 / 0.95
  (interpolated on the measured front, as the sweeps do).

The ratios to the reference (the densest graph) say how far the calibration's prediction of a
saving can be trusted, which is what the margin a step must clear (``LINK_MARGIN``) is for.
Prints a table and writes JSON.

Run: ``python -m flashgmm_ivf.eval.check_coarse_choice --dataset mnist-784 --dataset ...
--out eval/results/check_coarse_choice.json``
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from flashgmm_ivf.datasets import ground_truth
from flashgmm_ivf.ivf import calibration as cal_module
from flashgmm_ivf.ivf import index_factory
from flashgmm_ivf.ivf.probing import list_members

from .environment import environment
from .report import cost_at, front
from .runner import load_data, recommended_nlist

TARGETS = (0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
N_BINS = 16  # the default index's depth-table bins (probe='adaptive')


def check_set(dataset, data_dir=None, n_queries=2000):
    """Predicted and measured costs of every candidate coarse step on one set (a dict)."""
    data = load_data(dataset, data_dir=data_dir, max_learn=n_queries)
    if data.learn is not None:
        queries, which = data.learn[:n_queries], "learn"
        gt = ground_truth(data.base, queries, 10, "l2")
    else:
        queries, which = data.test[:n_queries], "test"
        gt = data.gt[:n_queries, :10]
    nlist = recommended_nlist(len(data.base))
    index = index_factory(data.base.shape[1], f"IVF{nlist}_GMM,Flat")
    index.train(data.base)
    index.add(data.base)
    index.search(queries[:1], 10, recall=0.9)  # fits the tables: the choice the default makes
    chosen = index.coarse_step
    ivf, calibration = index.index, index.calibration
    members = list_members(ivf)
    depth = cal_module.table_depth(ivf, calibration, members)
    rows = []
    candidates = cal_module.coarse_candidates(index.coarse, ivf.d, ivf.metric_type)
    for trial in cal_module.try_coarse_steps(ivf, calibration, N_BINS, candidates, members, depth):
        index.probe_table = cal_module.fit_table(ivf, calibration, N_BINS, depth=depth, members=members)
        curve = []
        for target in TARGETS:
            _, I = index.search(queries, 10, recall=target)
            found = np.mean([len(np.intersect1d(I[i], gt[i])) for i in range(len(queries))]) / 10
            curve.append({"recall_at_10": float(found), "dist_per_query": index.last_stats.per_query})
        rows.append({"coarse": trial.name, "predicted": trial.predicted, "score": trial.score,
                     "measured": {t: cost_at(front(curve), t) for t in (0.9, 0.95)}, "curve": curve})
    reference = rows[0]
    for row in rows:
        row["predicted_ratio"] = row["score"] / reference["score"]
        row["measured_ratio"] = {t: (None if row["measured"][t] is None or reference["measured"][t] is None
                                     else row["measured"][t] / reference["measured"][t]) for t in (0.9, 0.95)}
    return {"dataset": dataset, "n_base": int(len(data.base)), "nlist": nlist, "queries": which,
            "n_queries": int(len(queries)), "chosen_by_default": chosen, "margin": cal_module.LINK_MARGIN,
            "rows": rows}


def print_table(result):
    print(f"\n{result['dataset']} (nlist {result['nlist']}, {result['n_queries']} {result['queries']} queries; "
          f"default chose {result['chosen_by_default']})")
    print("| coarse | predicted x reference | measured @0.9 | @0.95 | dist/q measured @0.9 | @0.95 |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        ratio = ["n/r" if v is None else f"{v:.3f}" for v in row["measured_ratio"].values()]
        cost = ["n/r" if v is None else f"{v:,.0f}" for v in row["measured"].values()]
        print(f"| {row['coarse']} | {row['predicted_ratio']:.3f} | {ratio[0]} | {ratio[1]} | {cost[0]} | {cost[1]} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", required=True, help="repeatable: a registry name")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--queries", type=int, default=2000, help="held-out queries measured")
    parser.add_argument("--out", default="check_coarse_choice.json")
    args = parser.parse_args(argv)
    results = []
    for dataset in args.dataset:
        results.append(check_set(dataset, args.data_dir, args.queries))
        print_table(results[-1])
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "sets": results}, f, indent=1)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
