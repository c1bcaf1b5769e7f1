"""Tables and plots of sweep results: cost at a recall@10 target, ratios to the FAISS yardsticks.

A method's curve is the cost-recall front of its rows (a row is kept when no cheaper row of
the method reaches its recall@10); the cost at a target is interpolated linearly in log cost
between the two front points around it. Ratios read "x fewer distance computations than
<yardstick>" = yardstick's cost / the method's cost: above 1 the method wins.

    python -m flashgmm_ivf.eval.report eval/results/recipe_*.json --out eval/results/recipe_summary.md
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

__all__ = ["GOALS", "LEGEND", "MAX_COPIES", "TARGETS", "YARDSTICKS", "cost_at", "front", "main", "markdown", "plot",
           "runs_table", "summarize", "summary_table", "write"]

TARGETS = (0.9, 0.95)
YARDSTICKS = {"ivf": "FAISS IVF (flat)", "ivf-hnsw": "FAISS IVF_HNSW32"}
GOALS = {"ivf": 1.5, "ivf-hnsw": 1.15}   # "x fewer" wanted against each yardstick
MAX_COPIES = 1.5
QPS_TARGET = 0.9                          # QPS compared with FAISS IVF's at this recall@10
LEGEND = ("dist/q: distance computations per query (codes scanned + coarse step) to reach recall@10 = target, "
          "n/r: not reached; x fewer: yardstick's dist/q / the method's (> 1: fewer than the yardstick); "
          "QPS: queries per CPU second, single-thread, at recall@10 = 0.9.")


def front(curve, key="recall_at_10", cost="dist_per_query"):
    """The rows of ``curve`` on its cost-recall front, cost increasing."""
    out, best = [], -1.0
    for row in sorted(curve, key=lambda r: (r[cost], -r[key])):
        if row[key] > best:
            out.append(row)
            best = row[key]
    return out


def cost_at(curve, target, key="recall_at_10", value="dist_per_query"):
    """``value`` of a front (cost increasing) at recall ``target``, interpolated linearly in log.

    Returns
    -------
    float, or None when no point reaches the target. A target met at the first point returns
    that point's value (nothing cheaper was measured).
    """
    previous = None
    for point in curve:
        v, recall = point[value], point[key]
        if recall >= target:
            if previous is None:
                return v
            t = (target - previous[1]) / (recall - previous[1])
            return float(math.exp(math.log(previous[0]) + t * (math.log(v) - math.log(previous[0]))))
        previous = (v, recall)
    return None


def summarize(rows, targets=TARGETS):
    """Per method: cost, QPS and "x fewer" than each yardstick at each recall@10 target.

    Parameters
    ----------
    rows : list of dict (``runner.sweep`` rows with method, yardstick, copies_per_vector,
        index_bytes, build_s, and optionally recall_target)

    Returns
    -------
    list of dict, one per method, yardsticks first, else in order of appearance: method, yardstick, copies_per_vector,
    index_bytes, build_s, cost_at / qps_at / recall_when_asked {target: float|None} and
    x_fewer {yardstick: {target: float|None}}.
    """
    curves = {}
    for r in sorted(rows, key=lambda r: not r.get("yardstick")):  # stable: order of appearance otherwise
        curves.setdefault(r["method"], []).append(r)
    out = []
    for method, curve in curves.items():
        first, best = curve[0], front(curve)
        asked = {str(t): next((r["recall_at_10"] for r in curve if r.get("recall_target") == t), None)
                 for t in targets}
        out.append({"method": method, "yardstick": first.get("yardstick") or "",
                    "copies_per_vector": first["copies_per_vector"], "index_bytes": first.get("index_bytes"),
                    "build_s": first.get("build_s"),
                    "cost_at": {str(t): cost_at(best, t) for t in targets},
                    "qps_at": {str(t): cost_at(best, t, value="qps") for t in sorted({*targets, QPS_TARGET})},
                    "recall_when_asked": asked})
    for s in out:
        s["x_fewer"] = {}
        for key in YARDSTICKS:
            ref = next((r for r in out if r["yardstick"] == key), None)
            s["x_fewer"][key] = {t: None if ref is None or ref["cost_at"][t] is None or mine is None
                                 else ref["cost_at"][t] / mine for t, mine in s["cost_at"].items()}
    return out


def _num(v, fmt="{:,.0f}", missing="n/r"):
    return missing if v is None else fmt.format(v)


def markdown(summary, title, targets=TARGETS):
    """One set's summary as a markdown table."""
    head = " | ".join(f"@{t}" for t in targets)
    present = [k for k in YARDSTICKS if any(s["yardstick"] == k for s in summary)]
    def mb(s):
        return None if s["index_bytes"] is None else s["index_bytes"] / 1e6
    lines = [title, "", f"| method | dist/q {head} | "
             + "".join(f"x fewer than {YARDSTICKS[k]} {head} | " for k in present)
             + "copies/vector | index MB | QPS @0.9 | build s |",
             "|---|" + "---|" * (len(targets) * (1 + len(present)) + 4)]
    for s in summary:
        lines.append(f"| {s['method']} | " + " | ".join(_num(s["cost_at"][str(t)]) for t in targets) + " | "
                     + "".join(" | ".join(_num(s["x_fewer"][k][str(t)], "{:.2f}", "–") for t in targets) + " | "
                               for k in present)
                     + f"{s['copies_per_vector']:.2f} | {_num(mb(s), '{:.1f}', '–')} | "
                     + f"{_num(s['qps_at'][str(QPS_TARGET)], '{:,.0f}')} | {_num(s['build_s'], '{:.1f}', '–')} |")
    return "\n".join(lines)


def plot(rows, path, title):
    """Recall@10 against distance computations per query (log x): each method's front, its other rows as dots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"ivf": ("0.5", "--", "s"), "ivf-hnsw": ("0.1", ":", "^")}  # yardsticks in greys
    palette = iter(plt.cm.tab10.colors)
    for m in methods:
        curve = [r for r in rows if r["method"] == m]
        yardstick = curve[0].get("yardstick") or ""
        color, ls, marker = styles.get(yardstick) or (next(palette), "-", "o")
        best = front(curve)
        ax.plot([r["dist_per_query"] for r in best], [r["recall_at_10"] for r in best], color=color, ls=ls,
                marker=marker, ms=3.5, lw=1.6, label=m)
        rest = [r for r in curve if not any(r is b for b in best)]
        if rest:
            ax.scatter([r["dist_per_query"] for r in rest], [r["recall_at_10"] for r in rest], color=color, s=6,
                       alpha=0.35, lw=0)
    for t in TARGETS:
        ax.axhline(t, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("distance computations per query (codes scanned + coarse step, log)")
    ax.set_ylabel("recall@10")
    ax.set_ylim(max(0.5, min(r["recall_at_10"] for r in rows) - 0.02), 1.0)  # the range users pick from
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc, out, stem):
    """Write a sweep document's rows (.csv), the document (.json), the plot (.png) and its table (.md).

    Returns
    -------
    list of str, the paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / stem
    rows = doc["rows"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{base}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "params": json.dumps(r["params"], sort_keys=True)} if "params" in r else r
                         for r in rows)
    Path(f"{base}.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "files"}, indent=1) + "\n")
    plot(rows, f"{base}.png", doc["title"])
    Path(f"{base}.md").write_text(markdown(doc["summary"], f"**{doc['title']}**") + "\n\n" + LEGEND + "\n")
    return [f"{base}.{ext}" for ext in ("csv", "json", "png", "md")]


def _mark(ok):
    return "" if ok is None else (" ✓" if ok else " ✗ miss")


def summary_table(docs, targets=TARGETS) -> str:
    """One table over several sweep documents: every method of each set at each target against the goals.

    Goals (marked ✓ / ✗ miss on our methods): at least ``GOALS[y]`` x fewer distance
    computations than each yardstick y, at most ``MAX_COPIES`` copies per vector, and
    single-thread QPS at recall@10 = 0.9 not below FAISS IVF's.
    """
    head = ("| set (nlist) | recall@10 | method | dist/q | x fewer than FAISS IVF (flat) | x fewer than FAISS "
            "IVF_HNSW32 | copies | QPS @0.9 (FAISS IVF's) | recall@10 when asked |")
    lines = [head, "|" + "---|" * 9]
    for doc in docs:
        summary = doc["summary"]
        ivf = next((s for s in summary if s["yardstick"] == "ivf"), None)
        if ivf is None:
            raise ValueError(f"{doc.get('title', 'sweep')}: no FAISS IVF (flat) yardstick in the summary")
        ivf_qps = ivf["qps_at"][str(QPS_TARGET)]
        setname = f"{doc['dataset']['name']} ({doc['config']['nlist']})"
        for t in map(str, targets):
            for s in summary:
                ours = not s["yardstick"]
                cells = []
                for key in YARDSTICKS:
                    v = s["x_fewer"][key][t]
                    ok = None if not ours else (v is not None and v >= GOALS[key])
                    cells.append(("n/r" if s["cost_at"][t] is None else "–") if v is None
                                 else f"{v:.2f}{_mark(ok)}")
                copies = f"{s['copies_per_vector']:.3f}" + _mark(s["copies_per_vector"] <= MAX_COPIES + 1e-9
                                                                 if ours else None)
                qps = "–"
                if t == str(QPS_TARGET):
                    mine = s["qps_at"][t]
                    ok = None if not ours or mine is None or ivf_qps is None else mine >= ivf_qps
                    qps = f"{_num(mine)} ({_num(ivf_qps)}){_mark(ok)}"
                asked = s["recall_when_asked"].get(t)
                lines.append(f"| {setname} | {t} | {s['method']} | {_num(s['cost_at'][t])} | {cells[0]} | "
                             f"{cells[1]} | {copies} | {qps} | {_num(asked, '{:.3f}', '–')} |")
    return "\n".join(lines)


def runs_table(docs) -> str:
    """Where each sweep ran: set, base rows, nlist, test queries, commit, seconds and machine load per part."""
    lines = ["| set | base rows | nlist | test queries | part: methods | commit | seconds | load avg start / end |",
             "|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        data = doc["dataset"]
        parts = doc.get("earlier_runs", []) + [{
            "environment": doc["environment"], "seconds": doc.get("seconds"),
            "load_average_at_end": doc.get("load_average_at_end"),
            "methods": [m for m in doc["config"]["methods"]
                        if not any(m in e["methods"] for e in doc.get("earlier_runs", []))]}]
        for part in parts:
            env = part["environment"]
            load = f"{env['load_average_at_start'][0]:.1f} / " + _num((part.get("load_average_at_end") or [None])[0],
                                                                       "{:.1f}", "–")
            lines.append(f"| {data['name']} | {data['n_base']:,} | {doc['config']['nlist']} | {data['n_test']:,} | "
                         f"{', '.join(part['methods'])} | {(env.get('commit') or '?')[:10]}"
                         f"{' (+changes)' if env.get('uncommitted_changes') else ''} | "
                         f"{_num(part.get('seconds'), '{:.0f}', '–')} | {load} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="One table over several sweep JSONs, goals marked hit / miss.")
    parser.add_argument("files", nargs="+", help="sweep JSON documents (runner output)")
    parser.add_argument("--out", help="write the markdown here (default: print only)")
    parser.add_argument("--title", default="# Recall sweep summary")
    parser.add_argument("--note", action="append", default=[], help="a paragraph added at the end (repeatable)")
    args = parser.parse_args(argv)
    docs = [json.loads(Path(f).read_text()) for f in args.files]
    for doc in docs:  # from the rows, by this module's rules
        doc["summary"] = summarize(doc["rows"])
    text = "\n\n".join([args.title, summary_table(docs), LEGEND, "Runs (CPU: " + docs[0]["environment"]["device"]
                        + f", {docs[0]['environment']['cpu_count']} cores). Distance counts are exact and repeat "
                          "from run to run; QPS is " + docs[0]["config"]["qps"] + ", so other processes on the "
                          "machine do not count against it, though they still share its caches and memory bandwidth; "
                          "QPS of methods measured in different parts of a sweep were not measured side by side:",
                        runs_table(docs),
                        "Goals: >= " + ", ".join(f"{GOALS[k]}x fewer than {YARDSTICKS[k]}" for k in YARDSTICKS)
                        + f" at each target, <= {MAX_COPIES} copies per vector, QPS at recall@10 = {QPS_TARGET} "
                          "not below FAISS IVF's; ✓ hit, ✗ miss.", *args.note]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
