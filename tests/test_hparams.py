"""Every shipped hparams YAML loads strictly; strictness and round-trips of the loader."""
from pathlib import Path

import pytest
import yaml

from mixsd_edit.bench.spec import parse_method_entry, with_overrides
from mixsd_edit.hparams import HyperParamsError, hparams_dir
from mixsd_edit.methods import get_method, registered_methods

SHIPPED = sorted(p for p in hparams_dir().glob("*/*.yaml"))
PAPER_MODELS = {"smollm2-135m-instruct", "gemma3-270m", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "llama-3.2-1b-instruct"}


def test_mixsd_ships_every_required_model():
    assert {p.stem for p in (hparams_dir() / "MixSD").glob("*.yaml")} >= PAPER_MODELS


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_yaml_loads_and_round_trips(path):
    data = yaml.safe_load(path.read_text())
    method = get_method(data["alg_name"])
    assert path.parent.name in (method.name, data["alg_name"]) or path.parent.name.startswith(method.name)
    hp = method.hparams_cls.from_hparams(path)
    assert hp.alg_name == method.name
    again = method.hparams_cls.from_dict(yaml.safe_load(hp.to_yaml()))
    assert again == hp and again.fingerprint() == hp.fingerprint()


def _mixsd_yaml(tmp_path, **edit):
    src = yaml.safe_load((hparams_dir() / "MixSD" / "smollm2-135m-instruct.yaml").read_text())
    for k, v in edit.items():
        if v is KeyError:
            del src[k]
        else:
            src[k] = v
    p = tmp_path / "hp.yaml"
    p.write_text(yaml.safe_dump(src))
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    cls = get_method("MixSD").hparams_cls
    p = _mixsd_yaml(tmp_path, lambda_naive=0.3)
    with pytest.raises(HyperParamsError, match=r"hp.yaml.*unknown key\(s\) \['lambda_naive'\]"):
        cls.from_hparams(p)


def test_missing_key_names_key_and_file(tmp_path):
    cls = get_method("MixSD").hparams_cls
    with pytest.raises(HyperParamsError, match=r"hp.yaml.*missing key\(s\) \['mix_lambda'\]"):
        cls.from_hparams(_mixsd_yaml(tmp_path, mix_lambda=KeyError))


def test_yaml_float_strings_are_coerced_and_bad_types_rejected(tmp_path):
    cls = get_method("MixSD").hparams_cls
    hp = cls.from_hparams(_mixsd_yaml(tmp_path, lr="5e-4"))
    assert hp.lr == 5e-4
    with pytest.raises(HyperParamsError, match="'num_steps'"):
        cls.from_hparams(_mixsd_yaml(tmp_path, num_steps="many"))
    with pytest.raises(HyperParamsError, match="mix_lambda"):
        cls.from_hparams(_mixsd_yaml(tmp_path, mix_lambda=1.2))
    with pytest.raises(HyperParamsError, match="temperature"):
        cls.from_hparams(_mixsd_yaml(tmp_path, temperature=-1.0))
    with pytest.raises(HyperParamsError, match="lr"):
        cls.from_hparams(_mixsd_yaml(tmp_path, lr=0.0))
    with pytest.raises(HyperParamsError, match="alg_name"):
        cls.from_hparams(_mixsd_yaml(tmp_path, alg_name="ROME"))


def test_registry_refuses_duplicates_and_unknown_names():
    from mixsd_edit.registry import register_method

    assert "MixSD" in registered_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method("MixSD", lambda *a, **k: None, object)
    with pytest.raises(KeyError, match="unknown editing method"):
        get_method("NoSuchMethod")


# The variant YAMLs are their model's default YAML plus the overrides that BENCHMARKS.md's commands pass with
# --methods 'LABEL=MixSD:<overrides>'; a variant edited without its benchmark command (or the reverse) fails here.
VARIANTS = [
    ("smollm2-135m-instruct-sequential-l2", "smollm2-135m-instruct",
     "subject_key_names=64;subject_key_weight=1.0;delta_l2=3e-3;past_edit_key_weight=1.0"),
    ("smollm2-135m-instruct-batch", "smollm2-135m-instruct",
     "preserve_weight=30;preserve_dataset=model_samples;preserve_seq_len=32;exclude_batch_mean=true;preserve_swaps=8;"
     "subject_key_names=16;subject_key_weight=0.3;delta_l2=3e-3;train_batch_size=256"),
    ("gemma3-270m-batch", "gemma3-270m",
     "preserve_weight=30;preserve_dataset=model_samples;preserve_seq_len=32;preserve_swaps=8;exclude_batch_mean=true;"
     "train_batch_size=256;delta_l2=3e-2"),
    ("gemma3-270m-sequential", "gemma3-270m", "delta_l2=3e-2;past_edit_key_weight=0.1;subject_key_weight=3.0"),
]


@pytest.mark.parametrize("variant,base,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_yaml_is_its_default_plus_the_benchmarked_overrides(variant, base, overrides):
    cls = get_method("MixSD").hparams_cls
    spec = parse_method_entry(f"V=MixSD:{overrides}")
    default = cls.from_hparams(hparams_dir() / "MixSD" / f"{base}.yaml")
    assert spec.overrides and all(default.to_dict()[k] != v for k, v in spec.overrides.items())
    rebuilt = with_overrides(default, spec.overrides)
    assert rebuilt == cls.from_hparams(hparams_dir() / "MixSD" / f"{variant}.yaml")
