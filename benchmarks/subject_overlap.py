"""How much a *batch* of key_rank_one changes reaches other subjects (BENCHMARKS.md §12).

For a batch of CounterFact requests (tuning range) it forms MixSD's directions V (one column v_i per
request, the shipped hparams' key statistics) at some down_proj layers and reports, for the batch's own
subject keys and for held-out subjects' keys (another case range, standing in for neighbours and known
facts):

- offrow: mean over requests j of sum_{i != j} v_iᵀ k_j  (what request j's subject sees of the others;
  its own v_jᵀ k_j is 1);
- held-out sum / sumsq: mean over held-out subjects h of sum_i v_iᵀ h and of sum_i (v_iᵀ h)²;
- generic: sum_i v_iᵀ C v_i, the expected squared reach on ordinary text.

A held-out subject's output moves by sum_i (v_iᵀ h) u_i: the signed sum is the systematic part, sumsq
the part that grows with the number of edits even when the u_i are unrelated.

With --names k --name-weights w1,w2,... it adds rows for ``subject_key_names: k`` / ``subject_key_weight: w``
(C + w·E[h hᵀ] over the keys of k model-sampled names swapped into each batch prompt; with exclude_batch_mean).

    PYTHONPATH=. python3 benchmarks/subject_overlap.py --batch 500:600 --held-out 700:800 --layers 4,6,9
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.mixsd import MixSDHyperParams
from mixsd_edit.methods.mixsd.apply import edit_key_covariances, key_covariances
from mixsd_edit.methods.mixsd.key_delta import key_directions, subject_keys
from mixsd_edit.models import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MIXSD_EDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(DATA / "counterfact_easyedit" / "counterfact-edit-1k.json"))
    ap.add_argument("--batch", default="500:600")
    ap.add_argument("--held-out", default="700:800")
    ap.add_argument("--layers", default="4,6,9")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--names", type=int, default=0, help="subject_key_names for the extra rows (0: none)")
    ap.add_argument("--name-weights", default="1,10", help="subject_key_weight values for the extra rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hp = MixSDHyperParams.from_hparams(str(ROOT / "hparams" / "MixSD" / args.model))
    model, tok = load_model_and_tokenizer(hp.model_name)
    records = json.loads(Path(args.data).read_text())

    def requests(span):
        a, b = (int(x) for x in span.split(":"))
        return normalize_requests([{"prompt": r["prompt"], "target_new": r["target_new"], "subject": r["subject"]}
                                   for r in records[a:b]])

    mods = [f"model.layers.{int(l)}.mlp.down_proj" for l in args.layers.split(",")]
    K = subject_keys(model, tok, requests(args.batch), hp, mods)
    H = subject_keys(model, tok, requests(args.held_out), hp, mods)
    covs = key_covariances(model, tok, hp, mods)
    weights = [float(w) for w in args.name_weights.split(",")] if args.names > 0 else []
    augmented = {w: edit_key_covariances(model, tok, replace(hp, subject_key_names=args.names, subject_key_weight=w),
                                         mods, requests(args.batch)) for w in weights}
    print(f"key statistics: {hp.key_stats_dataset} ({hp.key_stats_n_tokens} tokens); batch {args.batch}, "
          f"held-out subjects {args.held_out}")
    print("| layer | directions | offrow | held-out sum | held-out sumsq | generic |")
    print("|---|---|---|---|---|---|")
    for m in mods:
        k, h = K[m].double(), H[m].double()
        C = covs.get(m)
        rows = [("v_i = C⁻¹k_i/(k_iᵀC⁻¹k_i)", C, False), ("exclude_batch_mean", C, True)]
        rows += [(f"exclude_batch_mean + names {args.names} x w={w:g}", augmented[w][m], True) for w in weights]
        for name, cov, excl in rows:
            V = key_directions(K[m], cov, exclude_batch_mean=excl).double()
            G = k @ V
            off = (G - torch.diag(torch.diag(G))).sum(1).mean()
            P = h @ V
            Cd = C.double() if C is not None else torch.eye(k.shape[1], dtype=torch.float64)
            generic = (V.T @ Cd @ V).diagonal().sum()
            print(f"| {m.split('.')[2]} | {name} | {off:+.3f} | {P.sum(1).mean():+.3f} | {(P ** 2).sum(1).mean():.3f} "
                  f"| {generic:.3f} |")


if __name__ == "__main__":
    main()
