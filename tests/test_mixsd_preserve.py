"""MixSD's preservation term (methods/mixsd/preserve.py) on a tiny random Llama."""
import pytest
import torch

from conftest import mixsd_hparams, tiny_llama
from mixsd_edit.hparams import HyperParamsError
from mixsd_edit.methods.locate.stats import StatsError
from mixsd_edit.methods.mixsd import apply_mixsd_to_model
from mixsd_edit.methods.mixsd.preserve import PreservationKL

pytestmark = pytest.mark.usefixtures("one_thread")


def _reqs():
    return [{"prompt": "Q w3 w4", "target_new": "w30", "subject": "w3"},
            {"prompt": "A w7 Q", "target_new": "w11 w12", "subject": "w7"}]


@pytest.fixture
def corpus(tmp_path, word_tok):
    g = torch.Generator().manual_seed(3)
    words = [f"w{int(i)}" for i in torch.randint(0, 40, (600,), generator=g)]
    p = tmp_path / "text.txt"
    p.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, 600, 20)) + "\n")
    return p


def _hp(corpus, **kw):
    base = dict(preserve_weight=0.0, preserve_dataset=str(corpus), preserve_n_tokens=120, preserve_seq_len=24,
                lr=5e-2, num_steps=8)
    base.update(kw)
    return mixsd_hparams(**base)


def test_preservation_kl_is_zero_for_the_base_and_grows_with_a_change(word_tok, corpus):
    model = tiny_llama(len(word_tok))
    pres = PreservationKL(model, word_tok, _hp(corpus, preserve_weight=1.0))
    assert pres.n_positions >= 120
    with torch.no_grad():
        assert float(pres(model)) < 1e-6
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(0.5 * torch.randn_like(w))
    kl = pres(model)
    assert float(kl.detach()) > 1e-3
    w.requires_grad_(True)
    kl.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


@pytest.mark.parametrize("delta", ["full", "key_rank_one"])
def test_the_term_keeps_the_model_closer_to_the_base(word_tok, corpus, delta):
    """Same edit, same steps: with preserve_weight > 0 the edited model's KL to the base on the preserved
    text is lower than without; the edit still moves the target's likelihood the same way."""
    measure = PreservationKL(tiny_llama(len(word_tok)), word_tok, _hp(corpus, preserve_weight=1.0))
    kls = {}
    for weight in (0.0, 20.0):
        model = tiny_llama(len(word_tok))
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(corpus, preserve_weight=weight, delta=delta))
        with torch.no_grad():
            kls[weight] = float(measure(model))
    assert kls[0.0] > 1e-4
    assert kls[20.0] < 0.7 * kls[0.0], kls


def test_edit_with_the_term_is_deterministic(word_tok, corpus):
    runs = []
    for _ in range(2):
        model = tiny_llama(len(word_tok))
        _, wc = apply_mixsd_to_model(model, word_tok, _reqs(), _hp(corpus, preserve_weight=2.0, delta="key_rank_one"),
                                     return_orig_weights=True)
        runs.append({k: model.get_parameter(k).detach().clone() for k in wc})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_weight_without_a_dataset_is_refused():
    with pytest.raises(HyperParamsError, match="preserve_dataset"):
        mixsd_hparams(preserve_weight=1.0, preserve_dataset=None)
    with pytest.raises(HyperParamsError, match="preserve_weight"):
        mixsd_hparams(preserve_weight=-1.0)


def test_missing_preservation_corpus_fails_before_any_model_work(word_tok, tmp_path):
    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StatsError, match="gone.txt"):
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(tmp_path / "gone.txt", preserve_weight=1.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- preserve_swaps: the same prompt about other names keeps its next token -------------------------------

from mixsd_edit.methods.mixsd import preserve as preserve_mod  # noqa: E402
from mixsd_edit.methods.mixsd.preserve import entity_names, swap_pairs, swap_prompts  # noqa: E402


def test_entity_names_takes_capitalised_runs_not_sentence_openers():
    text = 'Then we visited Paris. The Arctic Ocean is cold. "Please go", said Ann Lee in New York. Paris again.'
    assert entity_names(text) == ["Paris", "Arctic Ocean", "Ann Lee", "New York"]


def test_swap_prompts_replaces_the_last_subject_and_never_uses_a_subject():
    names = ["Ann Lee", "Bob", "Paris", "Old Paris", "Carl", "Dana"]
    out = swap_prompts(["Paris is in Paris,", "Bob speaks"], ["Paris", "Bob"], names, 2, seed=0)
    assert len(out) == 4
    assert all(o.startswith("Paris is in ") for o in out[:2]) and all(o.endswith(" speaks") for o in out[2:])
    used = {o[len("Paris is in "):-1] for o in out[:2]} | {o[: -len(" speaks")] for o in out[2:]}
    assert used <= {"Ann Lee", "Carl", "Dana"}  # "Bob", "Paris", "Old Paris" overlap a subject
    assert out == swap_prompts(["Paris is in Paris,", "Bob speaks"], ["Paris", "Bob"], names, 2, seed=0)
    assert out != swap_prompts(["Paris is in Paris,", "Bob speaks"], ["Paris", "Bob"], names, 2, seed=1)
    with pytest.raises(ValueError, match="preserve_swaps=6"):
        swap_prompts(["Bob speaks"], ["Bob"], names, 6, seed=0)


def test_swaps_need_the_preservation_weight():
    with pytest.raises(HyperParamsError, match="preserve_swaps"):
        mixsd_hparams(preserve_swaps=2, preserve_weight=0.0)
    with pytest.raises(HyperParamsError, match="preserve_swaps"):
        mixsd_hparams(preserve_swaps=-1)


_WORD_NAMES = ["w20", "w21 w22", "w23", "w24", "w25 w26", "w27", "w28", "w29"]


def _swap_kl(model, base, tok, reqs, names):
    """Mean KL(base || model) of the next token after every request prompt with its subject swapped."""
    prompts = swap_prompts([r["prompt"] for r in reqs], [r["subject"] for r in reqs], names, len(names), seed=0)
    kl = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            lp, lq = (m(input_ids=ids).logits[0, -1].log_softmax(-1) for m in (base, model))
            kl += float((lp.exp() * (lp - lq)).sum())
    return kl / len(prompts)


def test_swapped_prompts_are_scored_at_their_last_token_and_kept_closer(word_tok, corpus, monkeypatch):
    monkeypatch.setattr(preserve_mod, "entity_names", lambda text: list(_WORD_NAMES))
    hp = _hp(corpus, preserve_weight=5.0, preserve_swaps=3, delta="key_rank_one")
    base = tiny_llama(len(word_tok))
    pres = PreservationKL(base, word_tok, hp, _reqs())
    plain = PreservationKL(base, word_tok, _hp(corpus, preserve_weight=5.0), _reqs())
    assert len(pres.swapped) == 2 * 3
    assert pres.n_positions == plain.n_positions + 2 * 3  # one scored position per swapped prompt
    with torch.no_grad():
        assert float(pres(base)) < 1e-6
    kls = {}
    for swaps in (0, 3):
        model = tiny_llama(len(word_tok))
        apply_mixsd_to_model(model, word_tok, _reqs(), _hp(corpus, preserve_weight=5.0, preserve_swaps=swaps,
                                                            delta="key_rank_one", lr=0.2))
        kls[swaps] = _swap_kl(model, base, word_tok, _reqs(), _WORD_NAMES)
    assert kls[0] > 1e-4
    assert kls[3] < 0.8 * kls[0], kls


def test_swaps_refuse_a_request_without_its_subject_before_any_model_work(word_tok, corpus):
    from mixsd_edit.data.requests import RequestError
    model = tiny_llama(len(word_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = _reqs() + [{"prompt": "Q w5 w6", "target_new": "w30", "subject": "w9"}]
    with pytest.raises(RequestError, match="request 2: subject 'w9' does not occur"):
        apply_mixsd_to_model(model, word_tok, reqs, _hp(corpus, preserve_weight=5.0, preserve_swaps=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="request 1: subject 'w9' does not occur"):
        swap_prompts(["Q w3", "Q w5"], ["w3", "w9"], ["w20", "w21"], 1, seed=0)


def test_after_subject_scores_every_position_from_the_name_on(word_tok, corpus, monkeypatch):
    """``preserve_swap_positions: after_subject``: the swapped term is the mean KL over every (prompt,
    position) pair from the name's last token to the end, computed here by hand on full logits."""
    monkeypatch.setattr(preserve_mod, "entity_names", lambda text: list(_WORD_NAMES))
    base = tiny_llama(len(word_tok))
    hp = _hp(corpus, preserve_weight=5.0, preserve_swaps=3, preserve_swap_positions="after_subject")
    pres = PreservationKL(base, word_tok, hp, _reqs())
    last = PreservationKL(base, word_tok, _hp(corpus, preserve_weight=5.0, preserve_swaps=3), _reqs())
    plain = PreservationKL(base, word_tok, _hp(corpus, preserve_weight=5.0), _reqs())
    pairs = swap_pairs([r["prompt"] for r in _reqs()], [r["subject"] for r in _reqs()], _WORD_NAMES, 3, seed=42)
    spans = []  # (ids, index of the name's last token)
    for text, name in pairs:
        ids = word_tok(text)["input_ids"]
        head = word_tok(text[:text.rfind(name) + len(name)])["input_ids"]
        spans.append((ids, len(head) - 1))
    assert any(len(ids) - 1 - first >= 1 for ids, first in spans)  # some prompt has positions after the name
    assert pres.n_positions == plain.n_positions + sum(len(ids) - first for ids, first in spans)
    assert last.n_positions == plain.n_positions + len(spans)
    model = tiny_llama(len(word_tok))
    with torch.no_grad():
        assert float(pres(base)) < 1e-6
        w = model.model.layers[0].mlp.down_proj.weight
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        kls = []
        for ids, first in spans:
            x = torch.tensor([ids])
            lp, lq = (m(input_ids=x).logits[0, first:].float().log_softmax(-1) for m in (base, model))
            kls.extend((lp.exp() * (lp - lq)).sum(-1).tolist())
        expected = sum(kls) / len(kls)
        got = float(pres(model)) - float(plain(model))
        last_only = float(last(model)) - float(plain(model))
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert abs(last_only - expected) > 1e-4  # the last position alone gives another mean


def test_swap_positions_must_be_known():
    with pytest.raises(HyperParamsError, match="preserve_swap_positions"):
        mixsd_hparams(preserve_swap_positions="everywhere")


# --- preserve_checkpoint: the same term and the same edit, with the activations recomputed in backward -----

@pytest.mark.parametrize("delta", ["full", "key_rank_one"])
def test_checkpointing_gives_bit_identical_edits(word_tok, corpus, monkeypatch, delta):
    """With ``preserve_checkpoint`` the term's forward passes run again in backward: the edited weights
    must equal the ones trained without it bit for bit (text + swapped prompts in several length groups)."""
    monkeypatch.setattr(preserve_mod, "entity_names", lambda text: list(_WORD_NAMES))
    reqs = _reqs() + [{"prompt": "w5 w6 w8 Q", "target_new": "w31", "subject": "w6"}]
    runs, used = [], []
    real = preserve_mod.checkpoint

    def counting(*a, **kw):
        used.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(preserve_mod, "checkpoint", counting)
    for ckpt in (False, True):
        model = tiny_llama(len(word_tok))
        hp = _hp(corpus, preserve_weight=5.0, preserve_swaps=3, delta=delta, preserve_checkpoint=ckpt)
        _, wc = apply_mixsd_to_model(model, word_tok, reqs, hp, return_orig_weights=True)
        runs.append({k: model.get_parameter(k).detach().clone() for k in wc})
        if not ckpt:
            assert not used
    assert used  # the checkpointed run went through torch.utils.checkpoint
    assert any(not torch.equal(runs[0][k], wc[k]) for k in wc)  # the edit changed something
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_checkpointed_term_has_the_same_value_and_gradient(word_tok, corpus, monkeypatch):
    monkeypatch.setattr(preserve_mod, "entity_names", lambda text: list(_WORD_NAMES))
    base = tiny_llama(len(word_tok))
    terms = [PreservationKL(base, word_tok, _hp(corpus, preserve_weight=1.0, preserve_swaps=3,
                                                  preserve_checkpoint=c), _reqs()) for c in (False, True)]
    assert len(terms[1].groups) >= 1
    model = tiny_llama(len(word_tok))
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(0.5 * torch.randn_like(w))
    out = []
    for term in terms:
        model.zero_grad()
        kl = term(model)
        kl.backward()
        out.append((kl.detach().clone(), w.grad.clone()))
    assert float(out[0][0]) > 1e-3
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    with torch.no_grad():  # no graph: checkpointing is skipped, the value is the same
        assert torch.equal(terms[1](model), out[0][0])


# --- preserve_swaps_per_step: a fresh random subset of the swapped prompts at each step -------------------

def _per_prompt_last_kl(model, base, tok, pairs):
    out = []
    with torch.no_grad():
        for text, _ in pairs:
            x = torch.tensor([tok(text)["input_ids"]])
            lp, lq = (m(input_ids=x).logits[0, -1].float().log_softmax(-1) for m in (base, model))
            out.append(float((lp.exp() * (lp - lq)).sum()))
    return out


def test_swaps_per_step_scores_a_fresh_draw_per_request(word_tok, corpus, monkeypatch):
    """m = 1 of 3 swaps per request: each call's swapped part is the mean KL over one swapped prompt of
    request 0 and one of request 1 (checked against every such pair of the hand-computed per-prompt KLs,
    never two prompts of one request), the draws change from call to call and cover every prompt, and the
    same seed replays the same draws (the seed also picks the swapped names, so another seed is not
    compared here)."""
    monkeypatch.setattr(preserve_mod, "entity_names", lambda text: list(_WORD_NAMES))
    base = tiny_llama(len(word_tok))
    hp = _hp(corpus, preserve_weight=5.0, preserve_swaps=3, preserve_swaps_per_step=1)
    plain = PreservationKL(base, word_tok, _hp(corpus, preserve_weight=5.0), _reqs())
    pairs = swap_pairs([r["prompt"] for r in _reqs()], [r["subject"] for r in _reqs()], _WORD_NAMES, 3, seed=42)
    model = tiny_llama(len(word_tok))
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    kls = _per_prompt_last_kl(model, base, word_tok, pairs)
    means = {(a, b): (kls[a] + kls[b]) / 2 for a in range(len(kls)) for b in range(a + 1, len(kls))}
    assert len(set(round(v, 6) for v in means.values())) == len(means)  # each pair has its own mean

    def draws(term, n=12):
        out = []
        with torch.no_grad():
            for _ in range(n):
                got = float(term(model)) - float(plain(model))
                match = [s for s, v in means.items() if v == pytest.approx(got, rel=1e-3, abs=1e-6)]
                assert len(match) == 1, (got, means)
                out.append(match[0])
        return out

    first = draws(PreservationKL(base, word_tok, hp, _reqs()))
    assert all(a < 3 <= b for a, b in first)  # one prompt of each request, every time
    assert len(set(first)) > 1  # a fresh draw at each call
    assert set().union(*first) == set(range(len(kls)))  # every swapped prompt gets scored
    assert draws(PreservationKL(base, word_tok, hp, _reqs())) == first  # same seed, same draws


@pytest.mark.parametrize("per_step", [3, 100])
def test_swaps_per_step_at_or_above_the_count_is_the_full_term(word_tok, corpus, monkeypatch, per_step):
    """3 swaps per request: m >= 3 scores all of them, so the edit is bit-identical to m = 0; m = 2 trains
    on draws and gives other (deterministic) weights."""
    monkeypatch.setattr(preserve_mod, "entity_names", lambda text: list(_WORD_NAMES))

    def edit(m, seed=42):
        model = tiny_llama(len(word_tok))
        hp = _hp(corpus, preserve_weight=5.0, preserve_swaps=3, preserve_swaps_per_step=m, delta="key_rank_one",
                 seed=seed)
        _, wc = apply_mixsd_to_model(model, word_tok, _reqs(), hp, return_orig_weights=True)
        return {k: model.get_parameter(k).detach().clone() for k in wc}

    full, same = edit(0), edit(per_step)
    assert all(torch.equal(full[k], same[k]) for k in full)
    sub, again = edit(2), edit(2)
    assert all(torch.equal(sub[k], again[k]) for k in sub)
    assert any(not torch.equal(full[k], sub[k]) for k in full)


def test_swaps_per_step_is_validated():
    with pytest.raises(HyperParamsError, match="preserve_swaps_per_step"):
        mixsd_hparams(preserve_weight=1.0, preserve_dataset="x", preserve_swaps=2, preserve_swaps_per_step=-1)
    with pytest.raises(HyperParamsError, match="preserve_swaps_per_step.*needs preserve_swaps"):
        mixsd_hparams(preserve_weight=1.0, preserve_dataset="x", preserve_swaps=0, preserve_swaps_per_step=4)
