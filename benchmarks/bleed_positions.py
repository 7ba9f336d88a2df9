"""Where an edit reaches a neighbourhood prompt it should leave alone (BENCHMARKS.md §38).

For each CounterFact case in --cases, one edit alone on the unedited model (--alg with the shipped YAML for
--model, changed by --set), then for each neighbourhood prompt whose teacher-forced answer moved (EasyEdit
locality < 1) the edit's weight change ΔW (edited minus original weight of every Linear it touched) is taken
back at chosen token positions only — forward hooks subtract ΔW·k_t from the module's output at those
positions — and the neighbour's locality is measured again:

- all: every position of prompt + answer (gives back the unedited predictions: a check on the tool);
- prompt: the neighbourhood prompt's own positions, not the answer's;
- last: the prompt's last token (where the relation is read and the answer predicted);
- each: one position at a time (which single tokens carry enough of the change to move the answer);
- through: the shortest run of positions from the start whose taking back gives the answer back, named by its
  last token (the change must pass through the prompt up to there; with causal attention the later positions
  then see an unedited past).

It also reports how large the change is where it lands: ``size`` = Σ over edited modules of |ΔW k_t| at the token
of the edit's own prompt where that is largest (the subject's last token for key-directed edits), and per neighbour
``reach`` = the same at the neighbour's prompt token where it is largest, divided by ``size``; and both per edited
module. A method can move neighbours by a large change (big ``size``) or by a direction its neighbours' keys share
(big ``reach``).

The per-case rows go to --out as JSON lines; the summary is printed as a Markdown table.

    PYTHONPATH=. python3 benchmarks/bleed_positions.py --model gemma3-270m --alg MixSD --cases 500:520
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from mixsd_edit.bench.spec import parse_assignments, split_top_level
from mixsd_edit.data.loaders import load_counterfact
from mixsd_edit.evaluation.metrics import agreement, teacher_forced_predictions
from mixsd_edit.methods import get_method
from mixsd_edit.methods.locate.repr import module_by_name
from mixsd_edit.models import load_model_and_tokenizer
from mixsd_edit.prompting import PromptFormat

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MIXSD_EDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def weight_changes(model, originals: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module name: ΔW}`` for every changed ``<Linear>.weight`` in ``originals`` (name -> original value)."""
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    out = {}
    for name, orig in originals.items():
        mod_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(modules.get(mod_name), torch.nn.Linear):
            raise ValueError(f"{name}: only Linear weights can be taken back at positions")
        d = params[name].detach().float() - orig.float()
        if d.abs().max() > 0:
            out[mod_name] = d
    return out


@contextmanager
def _hooked(model, hooks: Mapping[str, Callable]) -> Iterator[None]:
    """``{module name: forward hook}`` registered for the block, removed after it."""
    handles = [module_by_name(model, m).register_forward_hook(h) for m, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def taken_back_at(model, deltas: Mapping[str, torch.Tensor], positions: Sequence[int]):
    """Context manager: within it the model acts as if ``deltas`` were not applied at ``positions`` (every row)."""
    pos = list(positions)

    def make_hook(d):
        def hook(module, args, output):
            out = output.clone()
            out[:, pos, :] -= (args[0][:, pos, :].float() @ d.T).to(out.dtype)
            return out
        return hook

    return _hooked(model, {m: make_hook(d) for m, d in deltas.items()})


@torch.no_grad()
def change_by_module(model, tok, fmt: PromptFormat, deltas: Mapping[str, torch.Tensor], prompt: str
                     ) -> dict[str, list[float]]:
    """``{module: |ΔW k_t| at each token of prompt}`` (its context ids) for every changed module."""
    got: dict[str, list[float]] = {}

    def make_hook(m, d):
        def hook(module, args, output):
            got[m] = (args[0][0].float() @ d.T).norm(dim=-1).tolist()
        return hook

    with _hooked(model, {m: make_hook(m, d) for m, d in deltas.items()}):
        model(input_ids=torch.tensor([fmt.context_ids(tok, prompt)], device=next(model.parameters()).device))
    return got


def summed_over_modules(by_module: Mapping[str, Sequence[float]]) -> list[float]:
    """Per token, the sum over modules of :func:`change_by_module`'s values."""
    return [sum(col) for col in zip(*by_module.values())]


def change_per_position(model, tok, fmt: PromptFormat, deltas: Mapping[str, torch.Tensor], prompt: str) -> list[float]:
    """Σ over the changed modules of |ΔW k_t| at each token of ``prompt``."""
    return summed_over_modules(change_by_module(model, tok, fmt, deltas, prompt))


def position_reverts(model, tok, fmt: PromptFormat, deltas: Mapping[str, torch.Tensor], prompt: str, answer: str,
                     before: Sequence[int]) -> dict:
    """Locality of one neighbour (``before``: its unedited teacher-forced predictions) with the change taken
    back at all / prompt / last / each single position."""
    ctx = fmt.context_ids(tok, prompt)
    n_ctx, seq = len(ctx), ctx + fmt.answer_ids(tok, answer)

    def loc(positions):
        with taken_back_at(model, deltas, positions):
            return agreement(before, teacher_forced_predictions(model, tok, fmt, [prompt], [answer])[0][0])

    through = next((t for t in range(len(seq)) if loc(range(t + 1)) >= 1), None)
    return {"tokens": [tok.decode([t]) for t in seq], "n_prompt": n_ctx,
            "all": loc(range(len(seq))), "prompt": loc(range(n_ctx)), "last": loc([n_ctx - 1]),
            "each": [loc([t]) for t in range(len(seq))], "through": through}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--alg", default="MixSD")
    ap.add_argument("--set", default="", help="hparam overrides, 'k=v;k=v'")
    ap.add_argument("--data", default=str(DATA / "counterfact_easyedit" / "counterfact-edit-1k.json"))
    ap.add_argument("--cases", default="500:520")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON lines, one per case")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    a, b = (int(x) for x in args.cases.split(":"))
    if a < 200:
        raise SystemExit("the first 200 cases are evaluation cases: diagnose on others")
    method = get_method(args.alg)
    hp = method.hparams_cls.from_hparams(ROOT / "hparams" / args.alg / args.model)
    hp = hp.replace(**parse_assignments(split_top_level(args.set, ";"), "--set"))
    model, tok = load_model_and_tokenizer(hp.model_name)
    fmt = PromptFormat(getattr(hp, "use_chat_template", False), getattr(hp, "system_prompt", None))
    rows = []
    for i, req in enumerate(load_counterfact(args.data, n=b - a, start=a)):
        nb = req["locality"]["neighborhood"]
        befores = [p for p, _ in teacher_forced_predictions(model, tok, fmt, nb["prompt"], nb["ground_truth"])]
        _, originals = method.apply_fn(model, tok, [req], hp, return_orig_weights=True)
        try:
            deltas = weight_changes(model, originals)
            afters = [p for p, _ in teacher_forced_predictions(model, tok, fmt, nb["prompt"], nb["ground_truth"])]
            edit_changes = change_by_module(model, tok, fmt, deltas, req["prompt"])
            size = max(summed_over_modules(edit_changes))
            at_edit = {m: max(v) for m, v in edit_changes.items()}
            for p, g, pre, post in zip(nb["prompt"], nb["ground_truth"], befores, afters):
                nb_changes = change_by_module(model, tok, fmt, deltas, p)
                row = {"case": a + i, "edit": req["prompt"], "target_new": req["target_new"], "neighbour": p,
                       "locality": agreement(pre, post), "size": size,
                       "reach": max(summed_over_modules(nb_changes)) / max(size, 1e-12), "size_by_module": at_edit,
                       "reach_by_module": {m: max(v) / max(at_edit[m], 1e-12) for m, v in nb_changes.items()}}
                if row["locality"] < 1:
                    row.update(position_reverts(model, tok, fmt, deltas, p, g, pre))
                rows.append(row)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
        finally:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, w in originals.items():
                    params[name].copy_(w)
    print(summary_table(rows, f"{args.model}, {args.alg}{' (' + args.set + ')' if args.set else ''}, cases {args.cases}"))


def summary_table(rows: Sequence[dict], title: str) -> str:
    moved = [r for r in rows if r["locality"] < 1]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    kept = [r for r in rows if r["locality"] >= 1]
    lines = [f"{title}: {len(rows)} neighbours, locality {mean([r['locality'] for r in rows]):.3f}, "
             f"{len(moved)} moved; change size at the edit (mean) {mean([r['size'] for r in rows]):.2f}; reach "
             f"(neighbour / edit, mean) moved {mean([r['reach'] for r in moved]):.2f}, kept "
             f"{mean([r['reach'] for r in kept]):.2f}", "",
             "| case | neighbour | taken back: all | prompt | last token | single tokens that give it back "
             "| from the start through |",
             "|---|---|---|---|---|---|---|"]
    for r in moved:
        singles = [t.strip() or repr(t) for t, v in zip(r["tokens"], r["each"]) if v >= 1]
        lines.append(f"| {r['case']} | {r['neighbour']} | {r['all']:.2f} | {r['prompt']:.2f} | {r['last']:.2f} | "
                     f"{', '.join(singles) or '(none alone)'} | {_through(r)} |")
    if moved:
        lines.append(f"| mean of {len(moved)} | | {mean([r['all'] for r in moved]):.2f} | "
                     f"{mean([r['prompt'] for r in moved]):.2f} | {mean([r['last'] for r in moved]):.2f} | | |")
    by_module = [r for r in rows if r.get("size_by_module")]
    if by_module:
        names = list(by_module[0]["size_by_module"])
        lines += ["", "| module | change size at the edit (mean) | reach, moved (mean) | reach, kept (mean) |",
                  "|---|---|---|---|"]
        for m in names:
            lines.append(f"| {m} | {mean([r['size_by_module'].get(m, 0.0) for r in by_module]):.2f} | "
                         f"{mean([r['reach_by_module'].get(m, 0.0) for r in by_module if r['locality'] < 1]):.2f} | "
                         f"{mean([r['reach_by_module'].get(m, 0.0) for r in by_module if r['locality'] >= 1]):.2f} |")
    return "\n".join(lines)


def _through(r: dict) -> str:
    t = r.get("through")
    if t is None:
        return "(never)"
    return f"{r['tokens'][t].strip() or repr(r['tokens'][t])} ({t + 1} of {r['n_prompt']} prompt tokens)"


if __name__ == "__main__":
    main()
