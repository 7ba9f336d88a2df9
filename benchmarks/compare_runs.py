"""One compact Markdown table from several `mixsd-edit bench` output folders (their summary.json).

Each bench run writes a wide table of its own; comparing settings across runs (one run per setting, as in
BENCHMARKS.md §12) needs the few columns that decide the trade-off side by side:

    PYTHONPATH=. python3 benchmarks/compare_runs.py results/tune-cf500-100-batch results/tune-cf500-100-batch-kl30

Rows: every edited method of every folder, in the order given (the unedited row once, from the first).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("rewrite", "post", "rewrite_acc"), ("rephrase", "post", "rephrase_acc"), ("locality", "post", "locality"),
           ("ES", "cf", "efficacy_score"), ("PS", "cf", "paraphrase_score"), ("NS", "cf", "neighborhood_score"),
           ("known facts (ratio)", "ret", "known_facts"), ("ppl (ratio)", "ret", "perplexity"),
           ("KL (nats)", "kl", "kl")]


def _cell(row: dict, where: str, key: str) -> str:
    if where == "post":
        v = row.get("post", {}).get(key)
    elif where == "cf":
        v = (row.get("counterfact") or {}).get("post", {}).get(key)
    elif where == "ret":
        v = (row.get("retention") or {}).get(key, {}).get("ratio")
    else:
        v = (row.get("retention") or {}).get(key, {}).get("post")
    if not v or v.get("mean") is None:
        return "-"
    ci = v.get("ci95")
    return f"{v['mean']:.3f}" + (f" ± {ci:.3f}" if ci else "")


def table(folders: list[str]) -> str:
    lines = ["| run | method | " + " | ".join(c[0] for c in COLUMNS) + " | wall s |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    unedited_done = False
    for folder in folders:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        for label, row in summary["rows"].items():
            if row.get("kind") == "unedited":
                if unedited_done:
                    continue
                unedited_done = True
            cells = [_cell(row, w, k) for _, w, k in COLUMNS]
            wall = row.get("wall_time_s")
            cells.append(f"{wall:.0f}" if wall else "-")
            lines.append(f"| {Path(folder).name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    print(table(ap.parse_args(argv).folders))


if __name__ == "__main__":
    main()
