"""One table over several sweep JSONs: the best GMM method of each set against FAISS k-means IVF.

For each sweep file (``flashgmm-ivf sweep`` output) and each recall@10 target, among methods
storing at most ``--max-copies`` copies per vector: FAISS k-means IVF's cost (``kmeans-niter25``,
flat quantizer, fixed nprobe, 1 copy), the cheapest GMM method, its factor ("x fewer"), its factor
against the best spilling rule at the same copies, the best GMM method of each per-query probing
(``@adaptive``, ``@radius``), and the cheapest k-means method. Prints markdown; ``--out`` writes it.

    python -m flashgmm_ivf.eval.summarize_sweeps eval/results/issue6-radius*_*.json --out summary.md --title '# ...'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "summary_rows"]

TARGETS = ("0.9", "0.95")
PER_QUERY = ("adaptive", "radius")


def summary_rows(doc: dict, max_copies: float = 1.5, targets=TARGETS) -> list[dict]:
    """Per target, the cells of the table for one sweep document (its 'summary' and 'config')."""
    summary = doc["summary"]
    ivf = [s for s in summary if s["method"] == "kmeans-niter25" and s["copies_target"] == 1.0]
    if not ivf:
        raise ValueError(f"{doc.get('title', 'sweep')}: no 'kmeans-niter25' at 1 copy, the yardstick")
    rows = []
    for t in targets:
        reference = ivf[0]["cost_at"][t]

        def cheapest(keep, t=t):
            found = [s for s in summary if keep(s) and s["copies_per_vector"] <= max_copies + 1e-9
                     and s["cost_at"][t] is not None]
            return min(found, key=lambda s: s["cost_at"][t]) if found else None

        def factor(s, t=t, reference=reference):
            return None if s is None or reference is None else reference / s["cost_at"][t]
        gmm = cheapest(lambda s: s["partition"].startswith("gmm"))
        spill = None if gmm is None or gmm["ratio_to_spill"][t] is None else 1 / gmm["ratio_to_spill"][t]
        kmeans = cheapest(lambda s: s["partition"].startswith("kmeans"))
        rows.append({"set": f"{doc['dataset']['name']} ({doc['config']['nlist']})", "recall": t,
                     "ivf": reference, "gmm": gmm and gmm["method"], "gmm_cost": gmm and gmm["cost_at"][t],
                     "gmm_factor": factor(gmm), "vs_spill": spill,
                     **{f"gmm_{p}": factor(cheapest(lambda s, p=p: s["partition"].startswith("gmm")
                                                    and s["probe"] == p)) for p in PER_QUERY},
                     "kmeans": kmeans and kmeans["method"], "kmeans_factor": factor(kmeans),
                     "qps": gmm and gmm["qps_at"][t], "mb": gmm and gmm["index_bytes"] / 1e6})
    return rows


def markdown(rows, max_copies: float = 1.5) -> str:
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)
    lines = [f"| set (nlist) | recall | FAISS k-means IVF dist/q | best GMM method (<= {max_copies:g} copies) | "
             "dist/q | x fewer than k-means IVF | x fewer than best spill, same copies | "
             + "".join(f"best GMM @{p}, x fewer | " for p in PER_QUERY)
             + "best k-means method | x fewer | GMM QPS | GMM index MB |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PER_QUERY) + "---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['recall']} | {num(r['ivf'], ',.0f')} | {r['gmm'] or '–'} | "
                     f"{num(r['gmm_cost'], ',.0f')} | **{num(r['gmm_factor'], '.2f')}** | {num(r['vs_spill'], '.2f')} | "
                     + "".join(f"{num(r[f'gmm_{p}'], '.2f')} | " for p in PER_QUERY)
                     + f"{r['kmeans'] or '–'} | {num(r['kmeans_factor'], '.2f')} | {num(r['qps'], ',.0f')} | "
                     f"{num(r['mb'], '.1f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="sweep JSON files")
    parser.add_argument("--max-copies", type=float, default=1.5)
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--title", help="a line written above the table")
    args = parser.parse_args(argv)
    rows = []
    for path in args.files:
        rows.extend(summary_rows(json.loads(Path(path).read_text()), args.max_copies))
    table = markdown(rows, args.max_copies)
    if args.title:
        table = f"{args.title}\n\n{table}"
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
