"""How much MixSD's key_rank_one change leaks onto other inputs, with and without whitening.

For CounterFact cases (tuning range by default) it takes each request's subject key k_i at the given
down_proj layers, forms v_i = C⁻¹k_i / (k_iᵀC⁻¹k_i) with C = identity and with C = E[k kᵀ] on
WikiText-2 (the ROME/MEMIT statistics, cached), and reports the mean |v_iᵀ k| over (a) keys of
ordinary WikiText-2 text and (b) the other requests' subject keys (v_iᵀ k_i = 1 by construction). A
change ΔW = u_i v_iᵀ moves the layer's output on an input k by |v_iᵀ k|·‖u_i‖, so smaller is more local.

    PYTHONPATH=. python3 benchmarks/key_overlap.py --cases 500:520 --layers 5,7
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mixsd_edit.data.requests import normalize_requests
from mixsd_edit.methods.locate.repr import capture_at_positions
from mixsd_edit.methods.locate.stats import second_moments
from mixsd_edit.methods.mixsd import MixSDHyperParams
from mixsd_edit.methods.mixsd.key_delta import key_directions, subject_keys
from mixsd_edit.models import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MIXSD_EDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--cases", default="500:520")
    ap.add_argument("--layers", default="5,7")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    a, b = (int(x) for x in args.cases.split(":"))
    hp = MixSDHyperParams.from_hparams(ROOT / "hparams" / "MixSD" / f"{args.model}.yaml")
    model, tok = load_model_and_tokenizer(args.model)
    cases = json.loads((DATA / "counterfact_easyedit" / "counterfact-edit-1k.json").read_text())[a:b]
    reqs = normalize_requests([{"prompt": c["prompt"], "target_new": c["target_new"], "subject": c["subject"]}
                               for c in cases])
    mods = [f"model.layers.{int(l)}.mlp.down_proj" for l in args.layers.split(",")]
    corpus = DATA / "wikitext2" / "wiki.test.raw"
    keys = subject_keys(model, tok, reqs, hp, mods)
    covs = second_moments(model, tok, mods, corpus, 100000, 256, progress=False)
    # ordinary-text keys: 8 windows of 128 tokens from a part of the file, every 6th position
    ids = tok(corpus.read_text(encoding="utf-8")[200000:230000])["input_ids"][:1024]
    seqs = [ids[i:i + 128] for i in range(0, 1024, 128)]
    text_keys = {m: [] for m in mods}
    for pos in range(5, 128, 6):
        got = capture_at_positions(model, seqs, [pos] * len(seqs), 0, inputs_of=mods)
        for m in mods:
            text_keys[m].append(got[("in", m)])
    n = len(reqs)
    print(f"{args.model}, CounterFact cases {args.cases}: mean |v_i^T k| (v_i^T k_i = 1)")
    for m in mods:
        G = torch.cat(text_keys[m])
        for name, C in (("identity C", None), ("WikiText-2 C", covs[m])):
            V = key_directions(keys[m], C)
            on_text = float((G @ V).abs().mean())
            on_others = float((keys[m] @ V).abs().fill_diagonal_(0).sum() / (n * (n - 1)))
            print(f"{m:34s} {name:13s} text keys {on_text:.3f}   other subjects {on_others:.3f}")


if __name__ == "__main__":
    main()
