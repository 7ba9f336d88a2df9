"""The benchmark runner: methods × data × mode on one model -> case files, summary.json, table.md.

Per method variant (a "row"), with the model loaded once and every row starting from the base model:

* ``single``: one edit per apply call, restored after each (the editor's default). CounterFact
  scores are taken per edit while it is applied (the editor's ``post_hook``); retention is measured
  on the first ``--retention-cases`` single edits only, each applied, measured and restored.
* ``batch``: all n edits in ONE apply call (hparams ``batch_size`` is set to n); the editor keeps
  the edits (``keep_edits=True``), CounterFact scores and retention are measured on that model,
  then ``weights_copy`` restores it. A method that cannot batch (ROME) becomes an "n/a" row with
  the editor's reason, or runs sequentially with ``--unbatchable sequential``.
* ``sequential``: edits accumulate one after another; scores and retention after the last one;
  then restored.

After every row the parameters are hashed and compared with the base model's hashes: a row that
leaves the model different from the base aborts the run (later rows would be measured on a
modified model). A row that fails is reported as "n/a: <reason>" and the run goes on (unless
``--fail-fast``). The "unedited" row comes first: the base model's pre metrics, CounterFact scores
and retention base values.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixsd_edit.bench import report
from mixsd_edit.bench.spec import (MethodSpec, check_global_set, effective_overrides, expand_lambda_sweep,
                                   parse_assignments, parse_floats, parse_methods, with_overrides)
from mixsd_edit.data.loaders import FORMATS, SAMPLE_NAME, detect_format, load_requests
from mixsd_edit.editor import BaseEditor
from mixsd_edit.evaluation.counterfact import counterfact_scores
from mixsd_edit.evaluation.edit_eval import evaluate_requests, summarize
from mixsd_edit.evaluation.metrics import PROTOCOLS
from mixsd_edit.evaluation.retention import RETENTION_PROTOCOLS
from mixsd_edit.evaluation.retention_suite import SUITES, RetentionConfig, RetentionSuite
from mixsd_edit.hparams import HyperParams, hparams_dir, resolve_hparams_path
from mixsd_edit.methods import get_method, registered_methods
from mixsd_edit.prompting import PromptFormat

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_METHODS = "MixSD,ROME,MEMIT,FT-L,FT-M,SFT"
DEFAULT_SUITES = "known_facts,perplexity,kl"  # MMLU/GSM8K: slow, and SmolLM2-135M is at chance on them
UNEDITED = "unedited"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (output folder taken, model not restored, ...)."""


def default_data_root() -> Path:
    env = os.environ.get("MIXSD_EDIT_SHARED_DATA")
    return Path(env) if env else hparams_dir().parent.parent / "shared" / "data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixsd-edit bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"offline alias, local path or hub name (default {DEFAULT_MODEL}); "
                   "also the hparams file stem")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of NAME or LABEL=NAME:key=value;key=value (hparams variants), e.g. "
                        f"'MixSD,MixSD-l0=MixSD:mix_lambda=0.0' (default {DEFAULT_METHODS})")
    p.add_argument("--hparams-dir", default=None, help="folder with <NAME>/<model>.yaml (default: the shipped hparams/)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="hparams overrides for every selected method that has the key (entry overrides win)")
    p.add_argument("--sweep-lambda", default=None, metavar="L1,L2,...",
                   help="replace MixSD by one variant per mix_lambda value, e.g. 0,0.1,0.3,0.5,0.7,1.0")
    p.add_argument("--data", default=os.environ.get("MIXSD_EDIT_DATA", SAMPLE_NAME),
                   help="requests file (CounterFact EasyEdit/ROME form, ZsRE MEND form) or 'sample'")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="data format (default: detected)")
    p.add_argument("--n", type=int, default=None, help="number of requests (default all)")
    p.add_argument("--start", type=int, default=0, help="index of the first request")
    p.add_argument("--mode", choices=("single", "batch", "sequential"), default="single",
                   help="single: each edit alone, restored; batch: all n edits in one apply call; "
                        "sequential: edits accumulate")
    p.add_argument("--unbatchable", choices=("skip", "sequential"), default="skip",
                   help="batch mode, method that edits one request per call (ROME): report n/a (skip, default) "
                        "or run it sequentially")
    p.add_argument("--counterfact", choices=("auto", "on", "off"), default="auto",
                   help="ROME-style ES/PS/NS scores pre and post (auto: on for CounterFact data)")
    p.add_argument("--retention", action="store_true", help="run the retention suite before and after the edits")
    p.add_argument("--retention-suites", default=DEFAULT_SUITES, help=f"comma list of {','.join(SUITES)} "
                   f"(default {DEFAULT_SUITES})")
    p.add_argument("--retention-cases", type=int, default=5,
                   help="single mode: measure retention on the first K single edits only (default 5)")
    p.add_argument("--data-root", default=None, help="shared data folder (known_1000/, wikitext2/, ...; "
                   "default $MIXSD_EDIT_SHARED_DATA, else ../shared/data next to the repo)")
    p.add_argument("--known-n", type=int, default=200, help="known_1000 facts checked on the base model")
    p.add_argument("--ppl-windows", type=int, default=4, help="WikiText perplexity windows")
    p.add_argument("--ppl-window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--kl-windows", type=int, default=4, help="WikiText KL windows")
    p.add_argument("--kl-window", type=int, default=256, help="tokens per KL window")
    p.add_argument("--wikitext-from-start", action="store_true",
                   help="perplexity/KL text from the start of WikiText-2 test, as runs before this flag existed "
                        "(default: from its end, away from the text ROME/MEMIT take their statistics from)")
    p.add_argument("--mmlu-n", type=int, default=100)
    p.add_argument("--gsm8k-n", type=int, default=50)
    p.add_argument("--retention-batch-size", type=int, default=8)
    p.add_argument("--no-generation", action="store_true", help="skip generation-based exact match")
    p.add_argument("--fluency", action="store_true", help="also score n-gram entropy of generated text")
    p.add_argument("--out", default=None, help="output folder (default results/bench/<model>-<data>-<mode>-n<n>)")
    p.add_argument("--overwrite", action="store_true", help="reuse an output folder that holds a summary.json")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MIXSD_EDIT_THREADS", "1")),
                   help="torch CPU threads (default 1, env MIXSD_EDIT_THREADS: on a small shared CPU more threads "
                        "were much slower; 0 leaves torch's setting)")
    p.add_argument("--seed", type=int, default=0, help="python/torch RNG seed set before every row (methods "
                   "also keep their hparams seed)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing row instead of n/a")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------- small helpers
def param_digests(model: torch.nn.Module, names=None) -> dict[str, str]:
    """blake2b of every parameter's bytes (or of ``names`` only): a cheap bit-exactness check."""
    out = {}
    for n, p in model.named_parameters():
        if names is None or n in names:
            t = p.detach().reshape(-1).contiguous()
            t = t if t.device.type == "cpu" else t.cpu()
            out[n] = hashlib.blake2b(t.view(torch.uint8).numpy().data, digest_size=16).hexdigest()
    return out


def check_restored(model: torch.nn.Module, base: dict[str, str], names=None, where: str = "") -> None:
    """Raise BenchError unless the (named) parameters hash exactly like the base model's."""
    bad = [n for n, d in param_digests(model, names).items() if base.get(n) != d]
    if bad:
        raise BenchError(f"{where}: the model is not bit-exactly the base model after restoring: {len(bad)} "
                         f"parameter(s) differ, e.g. {bad[:5]}")


def reset_peak_memory() -> bool:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs '5') and CUDA's peak counter."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory (MB) since the last reset (VmHWM), else over the process lifetime."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss, "peak_cuda_mb": cuda}


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _subjects(requests) -> list[str]:
    return [r["subject"] for r in requests if r.get("subject")]


def _data_format(data: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if data == SAMPLE_NAME:
        return "counterfact"
    p = Path(data).expanduser()
    with open(p, encoding="utf-8") as fh:
        first = json.loads(fh.readline()) if p.suffix == ".jsonl" else (json.load(fh) or [None])[0]
    return detect_format(first) or "unknown"


def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hparams_dir().parent, capture_output=True, text=True,
                           timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=hparams_dir().parent, capture_output=True,
                               text=True, timeout=10)
        return (r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _json(obj) -> str:
    return json.dumps(obj, indent=1, default=str)


# ----------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """Everything resolved before any model work."""
    specs: list[MethodSpec]
    hparams: dict[str, tuple[HyperParams, Path, dict[str, Any]]]  # label -> (hparams, file, overrides)
    requests: list[dict]
    data_format: str
    counterfact: bool
    retention: RetentionConfig | None
    out: Path
    argv: list[str] = field(default_factory=list)


def plan_run(args, argv: list[str]) -> Plan:
    """Parse methods, load every hparams file, load the data and check the output folder."""
    specs = parse_methods(args.methods, registered_methods())
    if args.sweep_lambda:
        specs = expand_lambda_sweep(specs, parse_floats(args.sweep_lambda, "--sweep-lambda"))
    global_set = parse_assignments(args.set, "--set")
    check_global_set(global_set, [get_method(s.name).hparams_cls for s in specs])
    hps = {}
    for s in specs:
        cls = get_method(s.name).hparams_cls
        path = (Path(args.hparams_dir) / s.name / f"{args.model}.yaml" if args.hparams_dir
                else resolve_hparams_path(s.name, args.model))
        hp = cls.from_hparams(path)
        over = effective_overrides(s, cls, global_set)
        if over:
            hp = with_overrides(hp, over, source=f"{path} with overrides {over}")
        hps[s.label] = (hp, path, over)
    requests = load_requests(args.data, n=args.n, start=args.start, fmt=args.format)
    data_format = _data_format(args.data, args.format)
    cf = args.counterfact == "on" or (args.counterfact == "auto" and data_format in ("counterfact", "counterfact_rome"))
    retention = None
    if args.retention:
        suites = tuple(x.strip() for x in args.retention_suites.split(",") if x.strip())
        retention = RetentionConfig.from_data_root(
            args.data_root or default_data_root(), suites=suites, known_n=args.known_n, ppl_windows=args.ppl_windows,
            ppl_window=args.ppl_window, kl_windows=args.kl_windows, kl_window=args.kl_window, mmlu_n=args.mmlu_n,
            gsm8k_n=args.gsm8k_n, batch_size=args.retention_batch_size,
            wikitext_from_end=not args.wikitext_from_start)
        missing = [s for s in suites if not retention.enabled(s)]
        if missing:
            raise FileNotFoundError(f"retention suite(s) {missing}: data not found under "
                                    f"{args.data_root or default_data_root()} (set --data-root)")
    if args.retention_cases < 0:
        raise ValueError("--retention-cases must be >= 0")
    n = len(requests)
    data_stem = SAMPLE_NAME if args.data == SAMPLE_NAME else Path(args.data).stem
    out = Path(args.out or Path("results") / "bench" / f"{Path(args.model).name}-{data_stem}-{args.mode}-n{n}")
    if (out / "summary.json").exists() and not args.overwrite:
        raise BenchError(f"{out} already holds a benchmark (summary.json); pass --overwrite or another --out")
    return Plan(specs, hps, requests, data_format, cf, retention, out, list(argv))


class Bench:
    """One run: the base model, its pre-computed references, and one row per method variant."""

    def __init__(self, args, plan: Plan, model, tok):
        self.args, self.plan, self.model, self.tok = args, plan, model, tok
        self.requests = plan.requests
        self.base_digests = param_digests(model)
        self._cf_pre: dict[PromptFormat, list[dict]] = {}
        self.suite: RetentionSuite | None = None
        if plan.retention is not None:
            t0 = time.perf_counter()
            self.suite = RetentionSuite(tok, plan.retention)
            self.suite.prepare(model)
            log.info("retention suite prepared in %.1fs: active %s, skipped %s", time.perf_counter() - t0,
                     self.suite.active, self.suite.skipped)

    def cf_pre(self, fmt: PromptFormat) -> list[dict] | None:
        """CounterFact scores of the base model (computed once per prompt format)."""
        if not self.plan.counterfact:
            return None
        if fmt not in self._cf_pre:
            check_restored(self.model, self.base_digests, where="before CounterFact pre scores")
            self._cf_pre[fmt] = [report.strip_counterfact(r)
                                 for r in counterfact_scores(self.model, self.tok, fmt, self.requests)]
        return self._cf_pre[fmt]

    # -------------------------------------------------------------- one row
    def run_row(self, spec: MethodSpec) -> tuple[dict, list[dict]]:
        """-> (summary row, case dicts). Failures become an n/a row (unless --fail-fast)."""
        args = self.args
        hp, hp_path, over = self.plan.hparams[spec.label]
        method = get_method(spec.name)
        n = len(self.requests)
        mode = args.mode
        if mode == "batch" and not method.batchable and args.unbatchable == "sequential":
            mode = "sequential"
        elif mode == "batch":
            hp = hp.replace(batch_size=n)  # all n edits in one apply call (the editor refuses it for ROME)
        row = {"kind": "method", "label": spec.label, "method": spec.name, "requested_mode": args.mode, "mode": mode,
               "n": n, "hparams_file": str(hp_path), "hparams_fingerprint": hp.fingerprint(), "hparams": hp.to_dict(),
               "overrides": over, "sweep": spec.sweep}
        seed_all(args.seed)
        reset_peak_memory()
        t0 = time.perf_counter()
        try:
            records, cf_post, per_case_ret, measurements, editor_summary, fmt = self._edit_and_measure(hp, mode)
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            if args.fail_fast:
                raise
            log.warning("%s failed: %s: %s", spec.label, type(e).__name__, e, exc_info=True)
            check_restored(self.model, self.base_digests, where=f"after the failed row '{spec.label}'")
            row.update(status="n/a", reason=f"{type(e).__name__}: {e}", wall_time_s=time.perf_counter() - t0,
                       **peak_memory())
            return row, []
        wall = time.perf_counter() - t0
        mem = peak_memory()
        cf_pre = self.cf_pre(fmt)
        row.update(status="ok", reason=None, pre=editor_summary["pre"], post=editor_summary["post"],
                   edit_time_s=editor_summary.get("edit_time_s"), model_state=editor_summary.get("model_state"),
                   wall_time_s=wall, restored_bit_exact=True, prompt_format=asdict(fmt), **mem)
        if "mixsd" in editor_summary:
            row["mixsd"] = editor_summary["mixsd"]
        if cf_pre is not None:
            row["counterfact"] = {"pre": report.counterfact_summary(cf_pre),
                                  "post": report.counterfact_summary([c for c in cf_post if c is not None])}
        if self.suite is not None:
            row["retention"] = report.aggregate_retention(measurements, RETENTION_PROTOCOLS)
            row["retention_scope"] = (f"first {len(measurements)} single edits, each applied, measured and restored"
                                      if mode == "single" else f"once, on the model holding all {n} edits")
        cases = []
        for r in records:
            i = r["case_id"]
            cases.append({
                "method": spec.name, "label": spec.label, "mode": mode, "case_id": i,
                "dataset_case_id": r["requested_rewrite"].get("case_id"), "requested_rewrite": r["requested_rewrite"],
                "pre": r["pre"], "post": r["post"],
                "counterfact_pre": cf_pre[i] if cf_pre is not None else None,
                "counterfact_post": cf_post[i] if cf_pre is not None else None,
                "retention": per_case_ret[i], "method_meta": r["method_meta"], "seed": args.seed,
                "hparams_seed": getattr(hp, "seed", None), "hparams_fingerprint": hp.fingerprint(),
                "chunk_size": r["chunk_size"], "wall_time_s": r["time"], "peak_rss_mb": mem["peak_rss_mb"],
            })
        return row, cases

    def _edit_and_measure(self, hp, mode):
        args, model, tok, reqs = self.args, self.model, self.tok, self.requests
        editor = BaseEditor(model, tok, hp, generation_eval=not args.no_generation, fluency=args.fluency,
                            progress=not args.quiet)
        fmt = editor.fmt
        self.cf_pre(fmt)  # base-model scores before any edit of this row
        n = len(reqs)
        cf_post: list[dict | None] = [None] * n
        per_case_ret: list[dict | None] = [None] * n
        measurements: list[dict] = []
        if mode == "single":
            def hook(edited, batch, ids):  # called while this edit is applied
                if self.plan.counterfact:
                    for i, rec in zip(ids, counterfact_scores(edited, tok, fmt, batch)):
                        cf_post[i] = report.strip_counterfact(rec)
                if self.suite is not None and len(measurements) < args.retention_cases:
                    m = report.compact_retention(self.suite.measure(edited, _subjects(batch)))
                    measurements.append(m)
                    for i in ids:
                        per_case_ret[i] = m

            records, _, _ = editor.edit_requests(reqs, post_hook=hook)
        else:
            if mode == "batch":
                records, _, wc = editor.batch_edit(reqs, keep_edits=True)
            else:
                records, _, wc = editor.sequential_edit(reqs)
            try:
                if self.plan.counterfact:
                    cf_post = [report.strip_counterfact(r) for r in counterfact_scores(model, tok, fmt, reqs)]
                if self.suite is not None:
                    measurements.append(report.compact_retention(self.suite.measure(model, _subjects(reqs))))
            finally:
                editor.restore(wc)
            check_restored(model, self.base_digests, names=set(wc), where=f"{hp.alg_name} restore")
        check_restored(model, self.base_digests, where=f"after {hp.alg_name}")
        return records, cf_post, per_case_ret, measurements, editor.last_summary, fmt

    # -------------------------------------------------------------- the unedited row
    def unedited_row(self, rows: dict[str, dict]) -> dict:
        ok = [r for r in rows.values() if r.get("status") == "ok"]
        if ok:
            src = ok[0]
            pre, fmt = src["pre"], PromptFormat(**src["prompt_format"])
        else:  # every method failed: score the base model directly
            hp = self.plan.hparams[self.plan.specs[0].label][0]
            fmt = PromptFormat(getattr(hp, "use_chat_template", False), getattr(hp, "system_prompt", None))
            recs = evaluate_requests(self.model, self.tok, self.requests, fmt, generation=not self.args.no_generation)
            pre, src = summarize([{"pre": r} for r in recs])["pre"], None
        row = {"kind": "unedited", "label": UNEDITED, "status": "ok", "reason": None, "mode": None,
               "n": len(self.requests), "pre": pre, "pre_from": src["label"] if src else "direct evaluation",
               "prompt_format": asdict(fmt)}
        cf_pre = self.cf_pre(fmt)
        if cf_pre is not None:
            row["counterfact"] = {"pre": report.counterfact_summary(cf_pre)}
        if self.suite is not None:
            row["retention"] = {
                s: {"pre": report.mean_ci([self.suite.pre[s]["score"]]), "post": report.mean_ci([self.suite.pre[s]["score"]]),
                    "ratio": report.mean_ci([1.0 if s in report.RATIO_SUITES else None]), "n_measurements": 0,
                    "n_items": [self.suite.pre[s].get("n")], "higher_is_better": self.suite.pre[s].get("higher_is_better"),
                    "protocol": RETENTION_PROTOCOLS.get(s)}
                for s in self.suite.active}
        return row

    def retention_note(self) -> str | None:
        if self.suite is None:
            return None
        c = self.plan.retention
        parts = []
        for s in self.suite.active:
            pre = self.suite.pre[s]
            if s == "known_facts":
                parts.append(f"known facts: {pre['n_known']} of the first {pre['n']} known_1000 prompts answered by "
                             f"the base model (greedy, {c.known_max_new_tokens} tokens, '{c.known_match}' match), "
                             f"edited subjects excluded")
            elif s == "perplexity":
                where = "at the end of" if c.wikitext_from_end else "at the start of"
                parts.append(f"perplexity: {c.ppl_windows} x {c.ppl_window} tokens {where} WikiText-2 test "
                             f"(base ppl {pre['score']:.2f})")
            elif s == "kl":
                where = "before" if c.wikitext_from_end else "after"
                parts.append(f"KL: {c.kl_windows} x {c.kl_window} tokens {where} the perplexity text, top-{c.kl_top_k}")
            else:
                parts.append(f"{s}: n={pre.get('n')} (base {pre['score']:.3f})")
        parts += [f"{s} skipped ({why})" for s, why in self.suite.skipped.items() if s in c.suites]
        if self.args.mode == "single":
            parts.append(f"single mode: retention measured on the first {self.args.retention_cases} single edits "
                         f"only (each applied, measured, restored)")
        return "; ".join(parts)


def _compact(d: dict) -> dict:
    """Suite pre results without long per-item lists."""
    return {k: v for k, v in d.items() if not (isinstance(v, list) and len(v) > 20)}


def run_bench(args, argv: list[str] | None = None, model=None, tok=None) -> dict:
    """Run the benchmark described by parsed ``args``; pass ``model``/``tok`` to skip loading.
    Writes ``cases/<label>/case_XXXXX.json``, ``hparams/<label>.yaml``, ``summary.json`` (after every
    row, so a crash keeps the finished rows) and ``table.md``; returns the summary."""
    t_start = time.perf_counter()
    argv = list(argv or [])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MIXSD_EDIT_SHARED_DATA", str(Path(args.data_root or default_data_root())))
    plan = plan_run(args, argv)
    out = plan.out
    (out / "cases").mkdir(parents=True, exist_ok=True)
    (out / "hparams").mkdir(exist_ok=True)
    for s in plan.specs:
        shutil.rmtree(out / "cases" / s.label, ignore_errors=True)
    if model is None:
        from mixsd_edit.models import load_model_and_tokenizer

        first_hp = plan.hparams[plan.specs[0].label][0]
        model, tok = load_model_and_tokenizer(args.model, device=first_hp.device)
    elif tok is None:
        raise ValueError("run_bench: a model was given without its tokenizer")
    bench = Bench(args, plan, model, tok)
    summary = {
        "command": "mixsd-edit bench " + shlex.join(argv), "out": str(out), "process_argv": list(sys.argv), "git_commit": _git_commit(),
        "model": args.model, "data": str(args.data), "data_format": plan.data_format, "start": args.start,
        "n": len(plan.requests), "mode": args.mode, "seed": args.seed, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": str(next(model.parameters()).device),
        "counterfact": plan.counterfact,
        "retention_config": ({k: v for k, v in asdict(plan.retention).items() if k != "known_format"}
                             if plan.retention else None),
        "retention_base": {s: _compact(v) for s, v in bench.suite.pre.items()} if bench.suite else None,
        "retention_skipped": dict(bench.suite.skipped) if bench.suite else None,
        "retention_note": bench.retention_note(),
        "protocols": report.table_protocols(PROTOCOLS, RETENTION_PROTOCOLS),
        "labels": [], "rows": {},
    }
    rows: dict[str, dict] = {}
    specs = plan.specs
    if not args.quiet:
        from tqdm.auto import tqdm

        specs = tqdm(specs, desc="bench rows", unit="row")
    for spec in specs:
        hp = plan.hparams[spec.label][0]
        (out / "hparams" / f"{spec.label}.yaml").write_text(hp.to_yaml())
        row, cases = bench.run_row(spec)
        rows[spec.label] = row
        if cases:
            folder = out / "cases" / spec.label
            folder.mkdir(parents=True, exist_ok=True)
            for c in cases:
                (folder / f"case_{c['case_id']:05d}.json").write_text(_json(c))
        summary["rows"] = {UNEDITED: bench.unedited_row(rows), **rows}
        summary["labels"] = list(summary["rows"])
        summary["total_wall_time_s"] = time.perf_counter() - t_start
        (out / "summary.json").write_text(_json(summary))
        (out / "table.md").write_text(report.render_table(summary))
    return summary
