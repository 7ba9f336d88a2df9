"""The benchmark runner (mixsd_edit.bench) end to end on a tiny random Llama, plus its pure parts.

Every run goes through the real argument parser, the strict hparams files (written to a tmp
``hparams/<ALG>/tiny.yaml``), the data loader (a CounterFact-form file), the editor, the ROME
CounterFact scores and the retention suite (known facts the tiny model itself answers, a word-level
WikiText stand-in), and writes case files, summary.json and table.md.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_DEPTH, TINY_METHODS, tiny_llama

from mixsd_edit.cli import bench_main
from mixsd_edit.bench import plot as bench_plot
from mixsd_edit.bench import report
from mixsd_edit.bench.runner import BenchError, build_parser, check_restored, param_digests, plan_run, run_bench
from mixsd_edit.bench.spec import (SpecError, expand_lambda_sweep, parse_methods, split_top_level)
from mixsd_edit.evaluation.metrics import greedy_generate
from mixsd_edit.prompting import PromptFormat

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 3
HP_OVERRIDES = {"FT-M": {"num_steps": 6}}


def new_model(vocab: int):
    return tiny_llama(vocab, seed=SEED, layers=TINY_DEPTH)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def env(tmp_path_factory, word_tok, corpus):
    """hparams/<ALG>/tiny.yaml, a CounterFact-form data file, and a data root with known facts
    (prompts whose greedy answer by the tiny base model is its attribute) and a WikiText stand-in."""
    tmp = tmp_path_factory.mktemp("bench")
    for alg, tm in TINY_METHODS.items():
        d = tmp / "hparams" / alg
        d.mkdir(parents=True)
        hp = tm.build(corpus, **HP_OVERRIDES.get(alg, {}))
        (d / "tiny.yaml").write_text(hp.to_yaml())
    cases = [{"case_id": 100 + i, "prompt": f"Q w{i} w{i + 1}", "subject": f"w{i}", "target_new": f"w{30 + i}",
              "ground_truth": f"w{i + 2}", "rephrase_prompt": f"A w{i} w{i + 1}", "locality_prompt": f"Q w{i + 10}",
              "locality_ground_truth": f"w{i + 11}"} for i in range(4)]
    (tmp / "cf.json").write_text(json.dumps(cases))
    root = tmp / "data"
    (root / "known_1000").mkdir(parents=True)
    (root / "wikitext2").mkdir()
    prompts = [f"w{i} w{(i * 7 + 3) % 40}" for i in range(16)]
    texts = greedy_generate(new_model(len(word_tok)), word_tok, PromptFormat(), prompts, 2)
    known = [{"known_id": i, "prompt": p, "subject": p.split()[0], "attribute": t.split()[0],
              "relation_id": "P0"} for i, (p, t) in enumerate(zip(prompts, texts)) if t.split()]
    assert len(known) >= 8 and {"w0", "w1", "w2"} <= {k["subject"] for k in known}  # some facts are about edited subjects
    (root / "known_1000" / "known_1000.json").write_text(json.dumps(known))
    (root / "wikitext2" / "wiki.test.raw").write_text(" ".join(f"w{(i * 7) % 40}" for i in range(400)))
    return {"tmp": tmp, "hp": tmp / "hparams", "data": tmp / "cf.json", "root": root, "n_known": len(known)}


@pytest.fixture(autouse=True)
def _env_vars(tmp_path_factory, monkeypatch, env):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path_factory.getbasetemp() / "stats_cache"))
    monkeypatch.setenv("MIXSD_EDIT_SHARED_DATA", str(env["root"]))


def argv_for(env, out, *extra):
    return ["--model", "tiny", "--hparams-dir", str(env["hp"]), "--data", str(env["data"]),
            "--data-root", str(env["root"]), "--known-n", "16", "--ppl-windows", "2", "--ppl-window", "16",
            "--kl-windows", "2", "--kl-window", "8", "--retention-batch-size", "8", "--threads", "0", "--quiet",
            "--out", str(out), *extra]


def run(env, out, word_tok, *extra, model=None):
    argv = argv_for(env, out, *extra)
    model = model if model is not None else new_model(len(word_tok))
    return run_bench(build_parser().parse_args(argv), argv, model=model, tok=word_tok), model


def case_files(out: Path, label: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cases" / label).glob("case_*.json"))]


def table_rows(md: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    return [rows[0]] + rows[2:]  # header, then data rows (the --- line dropped)


# ----------------------------------------------------------------------------- pure parts
def test_method_entries_labels_overrides_and_sweep():
    specs = parse_methods("MixSD, MixSD-l0=MixSD:mix_lambda=0.0;num_steps=3 ,FT-M-deep=FT-M:layers=[0,1]",
                          ["MixSD", "FT-M"])
    assert [(s.label, s.name, s.overrides) for s in specs] == [
        ("MixSD", "MixSD", {}), ("MixSD-l0", "MixSD", {"mix_lambda": 0.0, "num_steps": 3}),
        ("FT-M-deep", "FT-M", {"layers": [0, 1]})]
    assert split_top_level("a=[1,2],b='x,y'", ",") == ["a=[1,2]", "b='x,y'"]
    with pytest.raises(SpecError, match=r"unknown method 'Nope'.*registered methods: \['FT-M', 'MixSD'\]"):
        parse_methods("MixSD,Nope", ["MixSD", "FT-M"])
    with pytest.raises(SpecError, match="twice"):
        parse_methods("MixSD,MixSD", ["MixSD"])
    with pytest.raises(SpecError, match="needs a label"):
        parse_methods("MixSD:mix_lambda=0.5", ["MixSD"])

    swept = expand_lambda_sweep(parse_methods("ROME,MixSD,MixSD-fixed=MixSD:mix_lambda=0.9", None), [0.0, 0.3, 1.0])
    assert [s.label for s in swept] == ["ROME", "MixSD-lam0", "MixSD-lam0.3", "MixSD-lam1", "MixSD-fixed"]
    assert [s.overrides.get("mix_lambda") for s in swept] == [None, 0.0, 0.3, 1.0, 0.9]
    assert swept[2].sweep == {"param": "mix_lambda", "value": 0.3} and swept[4].sweep is None
    added = expand_lambda_sweep(parse_methods("ROME,SFT", None), [0.5])  # no MixSD entry: the sweep is added
    assert [s.label for s in added] == ["MixSD-lam0.5", "ROME", "SFT"]


def test_plan_resolves_sweep_hparams_and_refuses_bad_input(env, tmp_path):
    plan = plan_run(build_parser().parse_args(argv_for(env, tmp_path / "o", "--methods", "MixSD,FT-M",
                                                       "--sweep-lambda", "0,0.5", "--set", "num_steps=1")), [])
    assert [s.label for s in plan.specs] == ["MixSD-lam0", "MixSD-lam0.5", "FT-M"]
    hps = {k: v[0] for k, v in plan.hparams.items()}
    assert hps["MixSD-lam0"].mix_lambda == 0.0 and hps["MixSD-lam0.5"].mix_lambda == 0.5
    assert all(hp.num_steps == 1 for hp in hps.values())  # --set reaches every method that has the key
    assert hps["MixSD-lam0"].fingerprint() != hps["MixSD-lam0.5"].fingerprint()
    assert plan.counterfact and len(plan.requests) == 4
    parse = lambda *extra: build_parser().parse_args(argv_for(env, tmp_path / "o", *extra))
    with pytest.raises(SpecError, match="none of the selected methods"):
        plan_run(parse("--methods", "FT-M", "--set", "mix_lambda=0.1"), [])
    with pytest.raises(ValueError, match="bogus_key"):
        plan_run(parse("--methods", "X=FT-M:bogus_key=1"), [])
    with pytest.raises(ValueError, match="mix_lambda"):
        plan_run(parse("--methods", "MixSD", "--sweep-lambda", "0.5,1.5"), [])


def test_restore_check_detects_one_changed_element(word_tok):
    model = new_model(len(word_tok))
    base = param_digests(model)
    check_restored(model, base)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    with pytest.raises(BenchError, match="1 parameter.*layers.1.mlp.down_proj"):
        check_restored(model, base, where="test")
    check_restored(model, base, names={"model.layers.0.mlp.down_proj.weight"})  # only the named ones


def test_unknown_method_is_a_clear_cli_error(env, tmp_path, capsys):
    assert bench_main(argv_for(env, tmp_path / "o", "--methods", "MixSD,NoSuchMethod")) == 2
    err = capsys.readouterr().err
    assert "unknown method 'NoSuchMethod'" in err and "MixSD" in err and "ROME" in err
    assert not (tmp_path / "o").exists()  # refused before any work


# ----------------------------------------------------------------------------- runs on the tiny model
def test_single_mode_same_case_schema_unedited_first_and_bit_exact(env, tmp_path, word_tok):
    out = tmp_path / "single"
    model = new_model(len(word_tok))
    before = state(model)
    summary, _ = run(env, out, word_tok, "--methods", "MixSD,FT-M,ROME", "--n", "2", "--retention",
                     "--retention-cases", "1", model=model)
    assert same(before, state(model))  # every row restored the base model

    schemas = {}
    for label in ("MixSD", "FT-M", "ROME"):
        cases = case_files(out, label)
        assert [c["case_id"] for c in cases] == [0, 1] and [c["dataset_case_id"] for c in cases] == [100, 101]
        schemas[label] = [sorted(c) for c in cases]
        assert {"method", "label", "requested_rewrite", "pre", "post", "counterfact_pre", "counterfact_post",
                "method_meta", "seed", "hparams_fingerprint", "wall_time_s", "peak_rss_mb"} <= set(cases[0])
        assert cases[0]["label"] == label and cases[0]["hparams_fingerprint"] == summary["rows"][label]["hparams_fingerprint"]
        # retention: the first single edit only, measured while it was applied (the base has KL 0)
        assert cases[0]["retention"]["kl"]["post"] > 0 and cases[1]["retention"] is None
        assert cases[0]["retention"]["known_facts"]["n_excluded"] == 1  # the edited subject's fact left out
        # CounterFact post was taken on the edited model: the new target became more likely (the
        # fine-tuning methods; ROME barely steers a tiny random model, but it changes the scores)
        for c in cases:
            nll_pre, nll_post = c["counterfact_pre"]["rewrite"][0]["nll_new"], c["counterfact_post"]["rewrite"][0]["nll_new"]
            assert nll_post != nll_pre if label == "ROME" else nll_post < nll_pre, (label, nll_pre, nll_post)
    assert schemas["MixSD"] == schemas["FT-M"] == schemas["ROME"]

    assert summary["labels"][0] == "unedited" and summary["labels"][1:] == ["MixSD", "FT-M", "ROME"]
    row = summary["rows"]["FT-M"]
    assert row["status"] == "ok" and row["mode"] == "single" and "first 1 single edits" in row["retention_scope"]
    assert row["retention"]["known_facts"]["n_measurements"] == 1 and row["retention"]["kl"]["post"]["mean"] > 0
    assert set(row["counterfact"]["post"]) >= {"efficacy_score", "paraphrase_score", "neighborhood_score", "score"}
    unedited = summary["rows"]["unedited"]
    assert unedited["pre"] == summary["rows"]["MixSD"]["pre"] and unedited["retention"]["known_facts"]["ratio"]["mean"] == 1.0
    assert summary["command"].startswith("mixsd-edit bench --model tiny") and summary["n"] == 2

    md = (out / "table.md").read_text()
    head, *rows = table_rows(md)
    assert [r[0] for r in rows] == ["unedited", "MixSD", "FT-M", "ROME"]
    for col in ("rewrite_acc (TF tok-acc)", "ES (P(new)>P(true))", "known-fact ret. (post/pre)",
                "KL(base‖edited) (nats/token, lower=better)"):
        assert col in head
    es = head.index("ES (P(new)>P(true))")
    assert all(re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", r[es]) for r in rows)
    assert rows[0][head.index("locality (argmax agreement with base)")] == "1.000 (def.)"
    assert "single mode: retention measured on the first 1 single edits" in md
    assert json.loads((out / "summary.json").read_text())["labels"] == summary["labels"]
    assert yaml.safe_load((out / "hparams" / "FT-M.yaml").read_text())["num_steps"] == 6


def test_batch_mode_one_apply_call_rome_is_na_and_restore_is_bit_exact(env, tmp_path, word_tok):
    out = tmp_path / "batch"
    model = new_model(len(word_tok))
    before = state(model)
    summary, _ = run(env, out, word_tok, "--methods", "MixSD,ROME,MEMIT", "--n", "3", "--mode", "batch",
                     "--retention", model=model)
    assert same(before, state(model))
    rome = summary["rows"]["ROME"]
    assert rome["status"] == "n/a" and "cannot batch" in rome["reason"] and "ROME" in rome["reason"]
    assert not (out / "cases" / "ROME").exists()
    for label in ("MixSD", "MEMIT"):
        row = summary["rows"][label]
        assert row["status"] == "ok" and row["hparams"]["batch_size"] == 3, (label, row.get("reason"))
        if label == "MixSD":  # 3 requests fit one minibatch: each trained in every step, and no note says otherwise
            mix = row["mixsd"]
            assert mix["min_train_updates"] == mix["mean_train_updates"] == mix["mean_train_steps"] > 0
            assert "trained in" not in report.row_note(row)
        cases = case_files(out, label)
        assert [c["chunk_size"] for c in cases] == [3, 3, 3]  # one apply call for all edits
        assert len({c["wall_time_s"] for c in cases}) == 1
        ret = row["retention"]
        assert ret["kl"]["n_measurements"] == 1 and ret["kl"]["post"]["mean"] > 0  # measured on the edited model
        assert ret["known_facts"]["n_items"] == [env["n_known"] - 3]  # facts about w0, w1, w2 excluded
        assert "all 3 edits" in row["retention_scope"]
        # the lost facts are listed, as many as the ratio says, none about an edited subject
        lost, kept = ret["known_facts"]["lost"], ret["known_facts"]["n_items"][0]
        assert len(lost) == round((1 - ret["known_facts"]["post"]["mean"]) * kept)
        assert not {f["subject"] for f in lost} & {"w0", "w1", "w2"}
        assert all(f["times"] == 1 and "continuation" in f for f in lost)
        # per relation counts add up to the same facts and losses
        by_rel = ret["known_facts"]["by_relation"]
        assert sum(c["known"] for c in by_rel.values()) == kept and sum(c["lost"] for c in by_rel.values()) == len(lost)
    md = (out / "table.md").read_text()
    assert "Known facts lost" in md and "- **MixSD**: " in md and "- **MEMIT**: " in md
    assert "Known facts lost per known_1000 relation" in md or "Known facts lost per relation: none lost." in md
    _, *rows = table_rows(md)
    assert rows[0][0] == "unedited" and rows[2][0] == "ROME"
    assert rows[2][1] == "n/a" and "n/a: ValueError: method 'ROME'" in rows[2][-1]


def test_sequential_and_unbatchable_as_sequential(env, tmp_path, word_tok):
    out = tmp_path / "seq"
    model = new_model(len(word_tok))
    before = state(model)
    summary, _ = run(env, out, word_tok, "--methods", "ROME,FT-M", "--n", "2", "--mode", "batch",
                     "--unbatchable", "sequential", "--counterfact", "off", "--no-generation", model=model)
    assert same(before, state(model))
    rome, ftm = summary["rows"]["ROME"], summary["rows"]["FT-M"]
    assert (rome["mode"], rome["requested_mode"], ftm["mode"]) == ("sequential", "batch", "batch")
    assert "sequential" in rome["model_state"] and rome["hparams"]["batch_size"] == 1
    cases = case_files(out, "ROME")
    assert cases[0]["counterfact_post"] is None and "rewrite_gen_em" not in cases[0]["post"]
    assert "(asked: batch)" in (out / "table.md").read_text()


def test_failing_row_is_na_and_the_run_goes_on(env, tmp_path, word_tok, monkeypatch):
    import mixsd_edit.methods.ft.apply as ft_apply

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ft_apply, "edit_by_finetuning", boom)
    model = new_model(len(word_tok))
    before = state(model)
    summary, _ = run(env, tmp_path / "fail", word_tok, "--methods", "FT-M,FT-L", "--n", "1", "--no-generation",
                     model=model)
    assert [summary["rows"][k]["status"] for k in ("FT-M", "FT-L")] == ["n/a", "n/a"]
    assert summary["rows"]["FT-M"]["reason"] == "RuntimeError: boom"
    assert same(before, state(model))
    assert summary["rows"]["unedited"]["pre_from"] == "direct evaluation"  # no row succeeded

    def leaky(model, *a, **k):  # changes the model and fails without restoring it
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.add_(1.0)
        raise RuntimeError("leak")

    monkeypatch.setattr(ft_apply, "edit_by_finetuning", leaky)
    with pytest.raises(BenchError, match="not bit-exactly the base model"):
        run(env, tmp_path / "leak", word_tok, "--methods", "FT-M", "--n", "1", "--no-generation")


def test_output_folder_is_not_silently_reused(env, tmp_path, word_tok):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(BenchError, match="--overwrite"):
        run(env, out, word_tok, "--methods", "FT-M", "--n", "1")


# ----------------------------------------------------------------------------- plots
def _row(kind, label, method=None, es=None, acc=None, known=None, kl=None, lam=None, loc=0.8):
    row = {"kind": kind, "label": label, "status": "ok", "mode": "batch"}
    stage = "pre" if kind == "unedited" else "post"
    row[stage] = {"rewrite_acc": {"mean": acc, "ci95": 0.0}, "locality": {"mean": loc, "ci95": 0.0}}
    if es is not None:
        row["counterfact"] = {stage: {"efficacy_score": {"mean": es, "ci95": 0.01}}}
    ret = {}
    if known is not None:
        ret["known_facts"] = {"ratio": {"mean": known}, "post": {"mean": known}}
    if kl is not None:
        ret["kl"] = {"post": {"mean": kl}, "ratio": {"mean": None}}
    row["retention"] = ret
    if method:
        row.update(method=method, hparams={"mix_lambda": lam} if lam is not None else {})
    return row


def synthetic_summary(n=100, with_known=True, mode="batch"):
    rows = [_row("unedited", "unedited", es=0.1, acc=0.05, known=1.0 if with_known else None, kl=0.0)]
    for lam, es, known in ((0.0, 0.99, 0.90), (0.3, 0.97, 0.95), (1.0, 0.2, 1.0)):
        rows.append(_row("method", f"MixSD-lam{lam:g}", "MixSD", es=es, acc=es, known=known if with_known else None,
                         kl=0.01 + (1 - lam) * 0.05, lam=lam))
    for name, es, known in (("ROME", 1.0, 0.93), ("MEMIT", 0.95, 0.96), ("FT-M", 1.0, 0.8), ("SFT", 1.0, 0.7)):
        rows.append(_row("method", name, name, es=es, acc=es, known=known if with_known else None, kl=0.1))
    return {"model": "tiny", "data": "cf.json", "mode": mode, "n": n,
            "labels": [r["label"] for r in rows], "rows": {r["label"]: r for r in rows}}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lost_facts_merge_over_measurements_and_list_under_the_table():
    a = {"known_id": 3, "subject": "Ann", "prompt": "Ann speaks", "attribute": "French", "continuation": "German"}
    b = {"known_id": 5, "subject": "Bo", "prompt": "Bo plays", "attribute": "chess", "continuation": "go | x"}
    merged = report.merge_lost([{"lost": [a]}, {"lost": [b, a]}, {}])
    assert [(f["known_id"], f["times"]) for f in merged] == [(3, 2), (5, 1)]
    rows = [{"kind": "unedited", "label": "unedited", "status": "ok"},
            {"kind": "method", "label": "M", "status": "ok", "retention": {"known_facts": {"lost": merged}}},
            {"kind": "method", "label": "N", "status": "ok", "retention": {"known_facts": {"lost": []}}},
            {"kind": "method", "label": "O", "status": "ok", "retention": {"kl": {}}}]
    lines = report.lost_facts_lines(rows, limit=1)
    assert lines[2] == "- **M**: 2 lost:" and '[3] Ann speaks → expected "French", now "German" ×2' in lines[3]
    assert "1 more" in lines[4] and lines[5] == "- **N**: 0 lost" and len(lines) == 6  # O has no known-fact suite
    assert "/" in report.lost_facts_lines(rows[1:2], limit=2)[-1]  # a '|' in generated text cannot break the table


def test_lost_facts_per_relation_summed_over_measurements_and_tabled():
    m1 = {"by_relation": {"P17": {"known": 4, "lost": 1}, "P30": {"known": 2, "lost": 0}}}
    m2 = {"by_relation": {"P17": {"known": 4, "lost": 2}, "P103": {"known": 3, "lost": 3}}}
    merged = report.merge_by_relation([m1, m2, {}])
    assert merged == {"P103": {"known": 3, "lost": 3}, "P17": {"known": 8, "lost": 3},
                      "P30": {"known": 2, "lost": 0}}
    rows = [{"kind": "unedited", "label": "unedited", "status": "ok"},
            {"kind": "method", "label": "M", "status": "ok", "retention": {"known_facts": {"by_relation": merged}}},
            {"kind": "method", "label": "N", "status": "ok",
             "retention": {"known_facts": {"by_relation": {"P17": {"known": 4, "lost": 0}}}}},
            {"kind": "method", "label": "O", "status": "ok", "retention": {"known_facts": {}}}]  # older summary
    lines = report.relation_loss_lines(rows)
    assert lines[3] == "| relation | M | N |"
    # ties in losses keep relation order; relations nobody lost a fact in are left out
    assert lines[5:] == ["| P103 | 3 / 3 | - |", "| P17 | 3 / 8 | 0 / 4 |"]
    none = [rows[0], rows[2]]
    assert report.relation_loss_lines(none) == ["", "Known facts lost per relation: none lost."]
    assert report.relation_loss_lines(rows[:1] + rows[3:]) == []


def test_tradeoff_plot_writes_png_with_sweep_and_fixed_points(tmp_path):
    s = synthetic_summary()
    (tmp_path / "summary.json").write_text(json.dumps(s))
    info = bench_plot.plot_tradeoff(bench_plot.load_summaries([tmp_path]), tmp_path / "t.png")
    assert _is_png(tmp_path / "t.png")
    assert info["efficacy"] == "es" and info["retention"] == "known_facts" and info["points"] == 8
    assert info["sweep_points"] == 3
    # a MixSD variant that is not a λ-sweep point is a point of its own, not on the λ line
    s["rows"]["MixSD-lam0.3"]["sweep"] = None
    info = bench_plot.plot_tradeoff([s], tmp_path / "t2.png")
    assert info["points"] == 8 and info["sweep_points"] == 2
    no_known = synthetic_summary(with_known=False)  # falls back to the KL-based retention
    info = bench_plot.plot_tradeoff([no_known], tmp_path / "kl.png", swap_axes=True)
    assert info["retention"] == "kl" and _is_png(tmp_path / "kl.png")
    for r in no_known["rows"].values():
        r.pop("retention")
    with pytest.raises(bench_plot.PlotError, match="--retention"):
        bench_plot.plot_tradeoff([no_known], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_edit_curve_plot_and_the_thin_script(tmp_path):
    paths = []
    for n, mode in ((1, "batch"), (10, "batch"), (100, "batch"), (10, "sequential")):
        s = synthetic_summary(n=n, mode=mode)
        for r in s["rows"].values():
            r["mode"] = mode if r["kind"] == "method" else None
        p = tmp_path / f"{mode}{n}.json"
        p.write_text(json.dumps(s))
        paths.append(str(p))
    assert bench_main(["plot", "curve", *paths, "--out", str(tmp_path / "curve.png")]) == 0
    assert _is_png(tmp_path / "curve.png")
    info = bench_plot.plot_edit_curve(bench_plot.load_summaries(paths), tmp_path / "c2.png")
    assert info["n"] == [1, 10, 100] and info["series"] == 7 * 2  # 7 labels x {batch, sequential}
    # a single-mode run over 20 cases is the one-edit point of each label's batch line
    single = synthetic_summary(n=20, mode="single")
    for r in single["rows"].values():
        r["mode"] = "single" if r["kind"] == "method" else None
    (tmp_path / "single20.json").write_text(json.dumps(single))
    info = bench_plot.plot_edit_curve(bench_plot.load_summaries([*paths[1:], str(tmp_path / "single20.json")]),
                                      tmp_path / "c3.png")
    assert info["n"] == [1, 10, 100] and info["series"] == 7 * 2
    table = info["table"].splitlines()
    assert table[0] == "| method (mode) | 1 edit | 10 edits | 100 edits |" and len(table) == 2 + 7 * 2
    assert all(row.count(" / ") == 2 * 3 for row in table[2:] if "(batch)" in row)  # 1, 10 and 100 edits
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot_tradeoff.py"), paths[2], "--out",
                        str(tmp_path / "script.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _is_png(tmp_path / "script.png") and "efficacy: es" in r.stdout


def test_row_note_says_when_requests_were_trained_in_part_of_the_steps():
    row = {"status": "ok", "kind": "method", "mode": "batch", "requested_mode": "batch",
           "mixsd": {"fallback_share": 0.1, "min_train_updates": 18, "mean_train_updates": 25.6, "mean_train_steps": 40.0}}
    assert "each request trained in 25.6 of 40.0 steps on average (min 18" in report.row_note(row)
