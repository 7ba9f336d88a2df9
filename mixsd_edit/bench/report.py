"""Aggregating a benchmark's per-case results and writing its Markdown table.

Every aggregate is ``{"mean", "ci95", "n"}`` (normal-approximation 95% half-width over cases, or
over retention measurements). The table has the unedited model first, one row per method variant,
and one column per metric whose header names the protocol.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Mapping, Sequence

from mixsd_edit.evaluation.counterfact import COUNTERFACT_PROTOCOLS, summarize_counterfact

CF_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude",
           "paraphrase_magnitude", "neighborhood_magnitude")
RATIO_SUITES = ("known_facts", "perplexity", "mmlu", "gsm8k")  # retention column = post / pre
VALUE_SUITES = ("kl",)                                          # retention column = post value
LOST_SHOWN = 40  # known facts listed per row under the table (summary.json keeps them all)

# (column id, header). Column ids: "m:<editor metric>", "cf:<counterfact key>", "ret:<suite>", "time", "wall", "mem".
COLUMNS: list[tuple[str, str]] = [
    ("m:rewrite_acc", "rewrite_acc (TF tok-acc)"),
    ("m:rephrase_acc", "rephrase_acc (TF tok-acc)"),
    ("m:locality", "locality (argmax agreement with base)"),
    ("m:portability", "portability (TF tok-acc)"),
    ("m:rewrite_gen_em", "rewrite_gen_em (greedy EM)"),
    ("m:rephrase_gen_em", "rephrase_gen_em (greedy EM)"),
    ("m:fluency", "fluency (n-gram entropy, bits)"),
    ("cf:efficacy_score", "ES (P(new)>P(true))"),
    ("cf:paraphrase_score", "PS (P(new)>P(true), rephrase)"),
    ("cf:neighborhood_score", "NS (P(true)>P(new), neighbours)"),
    ("cf:score", "S (harmonic mean ES,PS,NS)"),
    ("cf:efficacy_magnitude", "EM (P(new)-P(true))"),
    ("cf:paraphrase_magnitude", "PM (P(new)-P(true), rephrase)"),
    ("cf:neighborhood_magnitude", "NM (P(true)-P(new), neighbours)"),
    ("ret:known_facts", "known-fact ret. (post/pre)"),
    ("ret:perplexity", "WikiText-2 ppl (post/pre, lower=better)"),
    ("ret:kl", "KL(base‖edited) (nats/token, lower=better)"),
    ("ret:mmlu", "MMLU ret. (post/pre)"),
    ("ret:gsm8k", "GSM8K ret. (post/pre)"),
    ("time", "edit time (s per apply call)"),
    ("wall", "wall time (s, whole row)"),
    ("mem", "peak RSS (MB, row)"),
]


def mean_ci(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean with a normal-approximation 95% half-width (None for a single value: one measurement
    says nothing about its spread); None values and NaN are left out."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0}
    ci = 1.96 * statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "ci95": ci, "n": len(vals)}


def counterfact_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-request ROME scores -> mean ± CI of each, plus S (harmonic mean of the ES/PS/NS means,
    ROME's two-level averaging; no CI) and the number of requests with each kind of prompt."""
    out: dict[str, Any] = {k: mean_ci(r.get(k) for r in records) for k in CF_KEYS}
    plain = summarize_counterfact(records)
    out["score"] = {"mean": plain["score"], "ci95": None, "n": len(records)}
    out.update({k: v for k, v in plain.items() if k.startswith("n_")})
    return out


def strip_counterfact(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A per-request CounterFact record without the repeated protocol texts."""
    return {k: v for k, v in rec.items() if k != "protocols"}


def compact_retention(measure: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One RetentionSuite.measure() result without the per-item details (kept: counts)."""
    out = {}
    for suite, r in measure.items():
        d = {k: r[k] for k in ("pre", "post", "ratio", "n", "higher_is_better", "seconds") if k in r}
        det = r.get("details") or {}
        if "n_excluded" in det:
            d["n_excluded"] = det["n_excluded"]
        if "lost" in det:  # known facts no longer answered (a few dozen at most): what the edits broke
            d["lost"] = list(det["lost"])
        if "by_relation" in det:  # per relation: facts scored, facts lost (a few dozen relations)
            d["by_relation"] = {rel: dict(c) for rel, c in det["by_relation"].items()}
        out[suite] = d
    return out


def merge_lost(measurements: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``lost`` facts of several measurements of one suite, once per fact (by known_id, else prompt),
    with ``times``: in how many measurements it was lost (the continuation is the first one seen)."""
    merged: dict[Any, dict[str, Any]] = {}
    for m in measurements:
        for fact in m.get("lost") or ():
            key = fact.get("known_id") if fact.get("known_id") is not None else fact.get("prompt")
            if key in merged:
                merged[key]["times"] += 1
            else:
                merged[key] = dict(fact, times=1)
    return list(merged.values())


def merge_by_relation(measurements: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """The ``by_relation`` counts of several measurements of one suite, summed per relation (so
    lost / known is the share of (measurement, fact) pairs lost)."""
    merged: dict[str, dict[str, int]] = {}
    for m in measurements:
        for rel, c in (m.get("by_relation") or {}).items():
            acc = merged.setdefault(rel, {"known": 0, "lost": 0})
            acc["known"] += int(c["known"])
            acc["lost"] += int(c["lost"])
    return dict(sorted(merged.items()))


def aggregate_retention(measurements: Sequence[Mapping[str, Mapping[str, Any]]],
                        protocols: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Several measure() results (one per measured edit or batch) -> per suite: pre, post and
    ratio as mean ± CI over the measurements, and the sample sizes."""
    out: dict[str, dict[str, Any]] = {}
    suites = [s for m in measurements for s in m]
    for suite in dict.fromkeys(suites):
        vals = [m[suite] for m in measurements if suite in m]
        out[suite] = {"pre": mean_ci(v["pre"] for v in vals), "post": mean_ci(v["post"] for v in vals),
                      "ratio": mean_ci(v["ratio"] for v in vals), "n_measurements": len(vals),
                      "n_items": [v["n"] for v in vals], "higher_is_better": vals[0]["higher_is_better"],
                      "protocol": protocols.get(suite)}
        if any("lost" in v for v in vals):
            out[suite]["lost"] = merge_lost(vals)
        if any("by_relation" in v for v in vals):
            out[suite]["by_relation"] = merge_by_relation(vals)
    return out


# ----------------------------------------------------------------------------- table
def _defined(value: float) -> dict[str, Any]:
    return {"mean": value, "ci95": None, "n": None, "note": "def."}


def row_cells(row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The table cells of one summary row: {column id: {"mean", "ci95", ...}}."""
    cells: dict[str, dict[str, Any]] = {}
    if row.get("status") != "ok":
        return cells
    unedited = row["kind"] == "unedited"
    metrics = row.get("pre" if unedited else "post") or {}
    for key, agg in metrics.items():
        cells[f"m:{key}"] = agg
    if unedited:
        cells["m:locality"] = _defined(1.0)  # agreement of the base model with itself
    cf = row.get("counterfact") or {}
    for key, agg in (cf.get("pre" if unedited else "post") or {}).items():
        if isinstance(agg, dict):
            cells[f"cf:{key}"] = agg
    for suite, r in (row.get("retention") or {}).items():
        if unedited:
            cells[f"ret:{suite}"] = _defined(0.0 if suite in VALUE_SUITES else 1.0)
        else:
            cells[f"ret:{suite}"] = r["post"] if suite in VALUE_SUITES else r["ratio"]
    if row.get("edit_time_s"):
        cells["time"] = row["edit_time_s"]
    if row.get("wall_time_s") is not None and not unedited:
        cells["wall"] = {"mean": row["wall_time_s"], "ci95": None}
    if row.get("peak_rss_mb") is not None and not unedited:
        cells["mem"] = {"mean": row["peak_rss_mb"], "ci95": None}
    return cells


def format_cell(cell: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    text = f"{cell['mean']:.{digits}f}"
    if cell.get("note"):
        return f"{text} ({cell['note']})"
    if cell.get("ci95") is not None:
        text += f" ± {cell['ci95']:.{digits}f}"
    return text


def row_note(row: Mapping[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"n/a: {row.get('reason')}"
    if row["kind"] == "unedited":
        return "base model before any edit (pre metrics)"
    parts = [f"mode={row['mode']}"]
    if row["mode"] != row.get("requested_mode"):
        parts.append(f"(asked: {row.get('requested_mode')})")
    if row.get("retention_scope"):
        parts.append(f"retention: {row['retention_scope']}")
    mix = row.get("mixsd")
    if mix:
        parts.append(f"MixSD fallback share {mix['fallback_share']:.2f}")
        if "mean_train_updates" in mix and mix["mean_train_updates"] < mix["mean_train_steps"]:
            parts.append(f"each request trained in {mix['mean_train_updates']:.1f} of {mix['mean_train_steps']:.1f} "
                         f"steps on average (min {mix['min_train_updates']}; batch > train_batch_size)")
    return "; ".join(parts)


def render_table(summary: Mapping[str, Any]) -> str:
    """Markdown: a header block, the table (unedited first), then the protocols of the columns."""
    rows = [summary["rows"][label] for label in summary["labels"]]
    cells = [row_cells(r) for r in rows]
    cols = [(cid, head) for cid, head in COLUMNS if any(cid in c for c in cells)]
    head = ["method"] + [h for _, h in cols] + ["notes"]
    lines = [f"# Benchmark: {summary['model']} · {summary['data']} · mode={summary['mode']} · n={summary['n']}", "",
             f"Command: `{summary['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r, c in zip(rows, cells):
        vals = [format_cell(c.get(cid), {"mem": 0, "wall": 1}.get(cid, 3)) if r.get("status") == "ok" else "n/a"
                for cid, _ in cols]
        lines.append("| " + " | ".join([r["label"], *vals, row_note(r).replace("|", "/")]) + " |")
    lines += ["", "Cells: mean ± 95% CI half-width (normal approximation) over cases; retention over the "
              "measured edits/batches (no ± when there is one measurement); '(def.)' = equal to the base model by "
              "definition; '-' = not measured.", ""]
    protocols = summary.get("protocols", {})
    lines.append("Protocols:")
    for cid, h in cols:
        text = protocols.get(cid.split(":", 1)[-1]) if ":" in cid else protocols.get(cid)
        if text:
            lines.append(f"- **{h}**: {text}")
    if summary.get("retention_note"):
        lines += ["", f"Retention: {summary['retention_note']}"]
    lines += lost_facts_lines(rows)
    lines += relation_loss_lines(rows)
    return "\n".join(lines) + "\n"


def lost_facts_lines(rows: Sequence[Mapping[str, Any]], limit: int = LOST_SHOWN) -> list[str]:
    """Markdown list, per edited row, of the known facts it no longer answers (the first ``limit``)."""
    lines: list[str] = []
    for r in rows:
        known = (r.get("retention") or {}).get("known_facts") or {}
        lost = known.get("lost")
        if r.get("kind") == "unedited" or r.get("status") != "ok" or lost is None:
            continue
        if not lines:
            lines += ["", "Known facts lost (greedy continuation after the edits; ×k = lost in k of the "
                      "row's retention measurements):"]
        lines.append(f"- **{r['label']}**: {len(lost)} lost" + (":" if lost else ""))
        for f in lost[:limit]:
            times = f" ×{f['times']}" if f.get("times", 1) > 1 else ""
            cont = " ".join(str(f.get("continuation", "")).split()).replace("|", "/")
            lines.append(f"  - [{f.get('known_id')}] {f['prompt']} → expected \"{f['attribute']}\", "
                         f"now \"{cont}\"{times}")
        if len(lost) > limit:
            lines.append(f"  - ... and {len(lost) - limit} more (summary.json has all)")
    return lines


def relation_loss_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown table of known facts lost per known_1000 relation (lost / scored) for the edited rows
    that have the counts; only relations where some row lost a fact, most losses first."""
    edited = [r for r in rows if r.get("kind") != "unedited" and r.get("status") == "ok"
              and ((r.get("retention") or {}).get("known_facts") or {}).get("by_relation") is not None]
    if not edited:
        return []
    counts = [r["retention"]["known_facts"]["by_relation"] for r in edited]
    rels = {rel for c in counts for rel, v in c.items() if v["lost"]}
    if not rels:
        return ["", "Known facts lost per relation: none lost."]
    order = sorted(rels, key=lambda rel: (-sum(c.get(rel, {}).get("lost", 0) for c in counts), rel))
    lines = ["", "Known facts lost per known_1000 relation (lost / scored; summed over the row's retention "
             "measurements):", "", "| relation | " + " | ".join(r["label"] for r in edited) + " |",
             "|---|" + "---|" * len(edited)]
    for rel in order:
        cells = [f"{c[rel]['lost']} / {c[rel]['known']}" if rel in c else "-" for c in counts]
        lines.append(f"| {rel} | " + " | ".join(cells) + " |")
    return lines


def table_protocols(editor_protocols: Mapping[str, str], retention_protocols: Mapping[str, str]) -> dict[str, str]:
    """Protocol text for every column id suffix (used by ``render_table``)."""
    out = dict(editor_protocols)
    out.update(COUNTERFACT_PROTOCOLS)
    out.update(retention_protocols)
    out["kl"] = retention_protocols.get("kl", "") + " (column: post value; base = 0)"
    for s in RATIO_SUITES:
        if s in retention_protocols:
            out[s] = retention_protocols[s] + " (column: post / pre)"
    out["time"] = "wall-clock seconds of the method's apply call (a batch's cases share one call)"
    out["wall"] = "wall-clock seconds of the whole row: edits, scoring, CounterFact scores and retention"
    out["mem"] = ("peak resident memory of the process during the row (Linux VmHWM, reset at the row's start via "
                  "/proc/self/clear_refs; where that is unavailable, the process-lifetime peak)")
    return out
