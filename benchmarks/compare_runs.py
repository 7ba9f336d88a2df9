"""One compact Markdown table from several `mixsd-edit bench` output folders (their summary.json).

Each bench run writes a wide table of its own; comparing settings across runs (one run per setting, as in
BENCHMARKS.md §12) needs the few columns that decide the trade-off side by side:

    PYTHONPATH=. python3 benchmarks/compare_runs.py results/tune-cf500-100-batch results/tune-cf500-100-batch-kl30

Rows: every edited method of every folder, in the order given (the unedited row once, from the first).

With ``--by-relation KNOWN_1000_JSON`` a second table counts the known facts each row lost per known_1000
relation (the ``lost`` lists of summary.json, mapped to ``relation_id`` by known_id), most losses first, with
one of the relation's templates and, from the first row whose summary has ``by_relation`` counts, how many
of the relation's facts that row scored (older summaries have the lost lists but not these counts).
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


def _edited_rows(folders: list[str]):
    for folder in folders:
        summary = json.loads((Path(folder) / "summary.json").read_text())
        for label, row in summary["rows"].items():
            if row.get("kind") != "unedited" and row.get("status") == "ok":
                yield f"{Path(folder).name} {label}", (row.get("retention") or {}).get("known_facts") or {}


def relation_table(folders: list[str], known_path: str) -> str:
    """Known facts lost per relation: one column per edited row that has a ``lost`` list."""
    records = json.loads(Path(known_path).read_text())
    relation = {r.get("known_id"): str(r.get("relation_id") or "?") for r in records}
    template = {}
    for r in records:
        template.setdefault(str(r.get("relation_id") or "?"), r.get("template") or r["prompt"])
    rows = [(name, kf) for name, kf in _edited_rows(folders) if kf.get("lost") is not None]
    lost = [{} for _ in rows]
    for counts, (_, kf) in zip(lost, rows):
        for fact in kf["lost"]:
            rel = str(fact.get("relation_id") or relation.get(fact.get("known_id"), "?"))
            counts[rel] = counts.get(rel, 0) + fact.get("times", 1)
    scored = next(({rel: c["known"] for rel, c in kf["by_relation"].items()}
                   for _, kf in rows if kf.get("by_relation")), {})
    rels = sorted({rel for c in lost for rel in c}, key=lambda rel: (-sum(c.get(rel, 0) for c in lost), rel))
    lines = ["| relation | template | scored | " + " | ".join(name for name, _ in rows) + " |",
             "|---" * (len(rows) + 3) + "|"]
    for rel in rels:
        lines.append(f"| {rel} | {template.get(rel, '?')} | {scored.get(rel, '-')} | "
                     + " | ".join(str(c.get(rel, 0)) for c in lost) + " |")
    lines.append("| all | | " + (str(sum(scored.values())) if scored else "-") + " | "
                 + " | ".join(str(sum(c.values())) for c in lost) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--by-relation", metavar="KNOWN_1000_JSON", default=None,
                    help="also count each row's lost known facts per relation (relation ids from this file)")
    args = ap.parse_args(argv)
    print(table(args.folders))
    if args.by_relation:
        print()
        print(relation_table(args.folders, args.by_relation))


if __name__ == "__main__":
    main()
