"""How large a single MixSD key_rank_one edit is, and how much of it other subjects receive (BENCHMARKS.md §19).

For each CounterFact case in --cases (a tuning range), one edit alone on the unedited model, for each
``delta_l2`` value in --delta-l2 (the rest from the hparams file, preservation switched off unless
--keep-preserve). Per edit, summed over the edited layers:

- |u|: the size of the change at the subject's own key (``ΔW k = u`` since ``vᵀk = 1``);
- rel: |u| / |W k| per layer, averaged over layers;
- reach: sqrt(mean over held-out subjects h of Σ_layers |ΔW h|²), h = the subject keys of --held-out cases
  (other subjects, standing in for neighbours and known facts);
- steps, and whether the greedy continuation of the prompt starts with target_new's first word.

    PYTHONPATH=. python3 benchmarks/delta_size.py --cases 500:510 --held-out 700:760 --delta-l2 0,3e-4,2e-3,1e-2
"""
from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from mixsd_edit.data.loaders import load_counterfact
from mixsd_edit.methods.mixsd import MixSDHyperParams, apply_mixsd_to_model
from mixsd_edit.methods.mixsd.key_delta import subject_keys
from mixsd_edit.models import load_model_and_tokenizer
from mixsd_edit.weights import restore_weights, select_parameters

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MIXSD_EDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _requests(path: str, span: str) -> list[dict]:
    a, b = (int(x) for x in span.split(":"))
    return load_counterfact(path, n=b - a, start=a)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hparams", default=None, help="hparams file (default hparams/MixSD/<model>.yaml)")
    ap.add_argument("--data", default=str(DATA / "counterfact_easyedit" / "counterfact-edit-1k.json"))
    ap.add_argument("--cases", default="500:510")
    ap.add_argument("--held-out", default="700:760")
    ap.add_argument("--delta-l2", default="0,3e-4,2e-3,1e-2")
    ap.add_argument("--keep-preserve", action="store_true", help="keep the file's preserve_weight")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = MixSDHyperParams.from_hparams(args.hparams or str(ROOT / "hparams" / "MixSD" / args.model))
    if not args.keep_preserve:
        base = replace(base, preserve_weight=0.0, preserve_swaps=0)
    if base.delta != "key_rank_one":
        raise SystemExit(f"{args.hparams or args.model}: delta is {base.delta!r}; this measures key_rank_one")
    model, tok = load_model_and_tokenizer(base.model_name)
    mods = [n[: -len(".weight")] for n in select_parameters(model, base.trainable_params, base.layers)]
    held = subject_keys(model, tok, _requests(args.data, args.held_out), base, mods)
    cases = _requests(args.data, args.cases)
    own = subject_keys(model, tok, cases, base, mods)
    print(f"{args.model}: cases {args.cases}, held-out {args.held_out}, layers {list(base.layers)}")
    print("| delta_l2 | mean abs u | rel to abs Wk | held-out reach | reach / abs u | steps | greedy right |")
    print("|---|---|---|---|---|---|---|")
    for l2 in (float(x) for x in args.delta_l2.split(",")):
        hp = replace(base, delta_l2=l2)
        rows = []
        for i, r in enumerate(cases):
            meta: list[dict] = []
            model, wc = apply_mixsd_to_model(model, tok, [r], hp, return_orig_weights=True, metadata_out=meta)
            u2 = reach2 = rel = 0.0
            with torch.no_grad():
                for m in mods:
                    W0 = wc[m + ".weight"]
                    dW = model.get_submodule(m).weight.detach() - W0
                    u = dW @ own[m][i]
                    u2 += float(u.norm()) ** 2
                    rel += float(u.norm() / (W0 @ own[m][i]).norm())
                    reach2 += float(((held[m] @ dW.T).norm(dim=1) ** 2).mean())
                ids = tok(r["prompt"], return_tensors="pt").input_ids
                out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:]).strip()
            right = text.startswith(r["target_new"].strip().split()[0])
            restore_weights(model, wc)
            rows.append((u2 ** 0.5, rel / len(mods), reach2 ** 0.5, meta[0]["train_steps"], right))
        mu = statistics.mean(x[0] for x in rows)
        reach = statistics.mean(x[2] for x in rows)
        print(f"| {l2:g} | {mu:.1f} | {statistics.mean(x[1] for x in rows):.3f} | {reach:.3f} | {reach / mu:.4f} | "
              f"{statistics.mean(x[3] for x in rows):.1f} | {sum(x[4] for x in rows)}/{len(rows)} |", flush=True)


if __name__ == "__main__":
    main()
