"""mixsd_edit.data.loaders: each format, slicing, skipping, errors, the shipped sample, the real data."""
import json
import logging
from pathlib import Path

import pytest

from mixsd_edit.data import loaders
from mixsd_edit.data.loaders import (DatasetError, load_counterfact, load_counterfact_rome,
                                     load_counterfact_rome_extras, load_requests, load_sample, load_zsre)
from mixsd_edit.data.requests import normalize_requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(tmp_path, name, records):
    p = tmp_path / name
    p.write_text(json.dumps(records), encoding="utf-8")
    return p


def cf(i, **kw):
    rec = {"case_id": 100 + i, "prompt": f"The mother tongue of Person{i} is", "target_new": "English",
           "subject": f"Person{i}", "ground_truth": "French", "rephrase_prompt": f"Person{i} speaks",
           "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    rec.update(kw)
    return rec


def rome(i):
    return {"case_id": i, "pararel_idx": 7,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                  "subject": f"Person{i}", "target_new": {"str": "English", "id": "Q1860"},
                                  "target_true": {"str": "French", "id": "Q150"}},
            "paraphrase_prompts": [f"Noise. Person{i} speaks", f"Person{i} grew up speaking"],
            "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Moulin spoke"],
            "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
            "generation_prompts": [f"Person{i}'s mother tongue is"]}


def zsre(i, alt="2006"):
    return {"subject": f"Event{i}", "src": f"When was the inception of Event{i}?", "pred": "2011",
            "rephrase": f"When was Event{i} launched?", "alt": alt, "answers": ["1998", "1999"],
            "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "cond": "2011 >> 2006 || ...",
            "portability": {"Recalled Relation": "(x, y, z)", "New Question": f"What year did Event{i} start?",
                            "New Answer": "2006"}}


def test_counterfact_easyedit_form(tmp_path):
    reqs = load_counterfact(write(tmp_path, "cf.json", [cf(0), cf(1)]))
    assert reqs[1] == {"prompt": "The mother tongue of Person1 is", "target_new": "English", "ground_truth": "French",
                       "subject": "Person1", "rephrase_prompt": ["Person1 speaks"],
                       "locality": {"neighborhood": {"prompt": ["Michel Rocard is a native speaker of"],
                                                     "ground_truth": ["French"]}},
                       "portability": {}, "case_id": 101}
    assert normalize_requests(reqs) == reqs  # already canonical


def test_counterfact_rome_form_and_extras(tmp_path):
    p = write(tmp_path, "counterfact.json", [rome(0), rome(1), rome(2)])
    reqs = load_counterfact_rome(p, n=2, start=1)
    assert [r["case_id"] for r in reqs] == [1, 2]
    r = reqs[0]
    assert r["prompt"] == "The mother tongue of Person1 is" and r["subject"] == "Person1"
    assert (r["target_new"], r["ground_truth"]) == ("English", "French")
    assert r["rephrase_prompt"] == ["Noise. Person1 speaks", "Person1 grew up speaking"]
    assert r["locality"] == {"neighborhood": {"prompt": ["Michel Rocard is a native speaker of", "Jean Moulin spoke"],
                                              "ground_truth": ["French", "French"]}}
    extras = load_counterfact_rome_extras(p, n=2, start=1)
    assert [e["case_id"] for e in extras] == [1, 2]
    assert extras[0] == {"case_id": 1, "relation_id": "P103",
                         "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
                         "generation_prompts": ["Person1's mother tongue is"]}
    assert load_requests(p) == load_counterfact_rome(p)  # detected


def test_rome_template_without_placeholder_is_an_error(tmp_path):
    bad = rome(0)
    bad["requested_rewrite"]["prompt"] = "The mother tongue of Person0 is"
    with pytest.raises(DatasetError, match=r"record 0.*'\{\}'"):
        load_counterfact_rome(write(tmp_path, "bad.json", [bad]))


def test_zsre_form_skips_empty_alt_and_strips_spaces(tmp_path, caplog):
    p = write(tmp_path, "zsre.json", [zsre(0), zsre(1, alt=""), zsre(2, alt=" Delaware River"), zsre(3, alt="  ")])
    with caplog.at_level(logging.WARNING, logger="mixsd_edit.data.loaders"):
        reqs = load_zsre(p)
    assert "skipped 2 of 4" in caplog.text
    assert [r["case_id"] for r in reqs] == [0, 2]  # the place in the file, not in the output
    assert reqs[1]["target_new"] == "Delaware River"
    r = reqs[0]
    assert (r["prompt"], r["target_new"], r["ground_truth"]) == ("When was the inception of Event0?", "2006", "1998")
    assert r["rephrase_prompt"] == ["When was Event0 launched?"] and r["subject"] == "Event0"
    assert r["locality"] == {"nq": {"prompt": ["nq question: who wrote hamlet"], "ground_truth": ["Shakespeare"]}}
    assert r["portability"] == {"one_hop": {"prompt": ["What year did Event0 start?"], "ground_truth": ["2006"]}}
    # n and start count usable records: start=1 is record 2, not the empty record 1
    assert [r["case_id"] for r in load_zsre(p, n=1, start=1)] == [2]
    assert load_requests(p) == reqs


def test_slicing(tmp_path):
    p = write(tmp_path, "cf.json", [cf(i) for i in range(5)])
    ids = lambda reqs: [r["case_id"] for r in reqs]  # noqa: E731
    assert ids(load_counterfact(p, n=2)) == [100, 101]
    assert ids(load_counterfact(p, n=2, start=3)) == [103, 104]
    assert ids(load_counterfact(p, n=10, start=4)) == [104]
    assert ids(load_counterfact(p, start=5)) == [] and ids(load_counterfact(p, n=0)) == []
    for bad in ({"n": -1}, {"start": -2}, {"n": 1.5}):
        with pytest.raises(DatasetError, match="n must|start must"):
            load_requests(p, **bad)


def test_case_id_defaults_to_file_position(tmp_path):
    recs = [cf(0), cf(1)]
    for r in recs:
        del r["case_id"]
    assert [r["case_id"] for r in load_counterfact(write(tmp_path, "cf.json", recs), start=1)] == [1]


def test_canonical_request_files_and_jsonl(tmp_path):
    canon = [{"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompt": ["France's capital is"],
              "locality": {"x": {"prompt": "The capital of Spain is", "ground_truth": "Madrid"}}}]
    reqs = load_requests(write(tmp_path, "mine.json", canon))
    assert reqs[0]["locality"]["x"]["ground_truth"] == ["Madrid"] and reqs[0]["case_id"] == 0
    jl = tmp_path / "cf.jsonl"
    jl.write_text("\n".join(json.dumps(cf(i)) for i in range(3)) + "\n", encoding="utf-8")
    assert [r["case_id"] for r in load_requests(jl, n=2)] == [100, 101]


def test_errors_name_the_file_and_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.json"):
        load_requests(tmp_path / "no_such_file.json")
    with pytest.raises(FileNotFoundError, match="sampel"):
        load_requests("sampel")
    p = write(tmp_path, "known.json", [{"known_id": 0, "subject": "x", "attribute": "y", "template": "{} is"}])
    with pytest.raises(DatasetError, match=r"known\.json: unrecognised dataset format.*known_id"):
        load_requests(p)
    with pytest.raises(DatasetError, match="unknown dataset format 'rome'"):
        load_requests(p, fmt="rome")
    with pytest.raises(DatasetError, match=r"missing\.json: record 1: field 'target_new' is missing"):
        load_counterfact(write(tmp_path, "missing.json", [cf(0), {"prompt": "x"}]))
    with pytest.raises(DatasetError, match=r"empty\.json: request 0: field 'target_new' is empty"):
        load_counterfact(write(tmp_path, "empty.json", [cf(0, target_new=" ")]))
    with pytest.raises(DatasetError, match="holds no records"):
        load_requests(write(tmp_path, "none.json", []))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_requests(write(tmp_path, "dict.json", {"data": []}))
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.json: not valid JSON"):
        load_requests(tmp_path / "broken.json")


def test_shipped_sample():
    assert loaders.sample_path().is_file()
    reqs = load_sample()
    assert load_requests() == reqs == load_requests("sample")
    assert len(reqs) >= 30
    assert len({r["case_id"] for r in reqs}) == len(reqs)
    assert len({r["prompt"] for r in reqs}) == len(reqs)
    for r in reqs:
        assert r["subject"] and r["subject"] in r["prompt"], r
        assert r["ground_truth"] and r["target_new"] != r["ground_truth"], r
        assert len(r["rephrase_prompt"]) == 1 and r["rephrase_prompt"][0] != r["prompt"], r
        loc = r["locality"]["neighborhood"]
        assert r["subject"] not in loc["prompt"][0], r
        # the locality answer must not be the new target, or a leaking edit would look harmless
        assert loc["ground_truth"][0] != r["target_new"], r
    assert sum(" " in r["target_new"] for r in reqs) >= 5  # multi-word targets are represented
    assert [r["case_id"] for r in load_requests("sample", n=3, start=2)] == [2, 3, 4]


def test_sample_ships_with_the_package():
    setup = Path(loaders.__file__).resolve().parents[2] / "setup.py"
    if not setup.is_file():
        pytest.skip("no setup.py yet")
    assert "sample_counterfact.json" in setup.read_text() or "*.json" in setup.read_text()


CF = SHARED / "counterfact_easyedit" / "counterfact-edit.json"
ZSRE = SHARED / "zsre_easyedit" / "zsre_mend_eval_portability_gpt4.json"


@pytest.mark.skipif(not CF.is_file(), reason=f"{CF} not present")
def test_real_counterfact_file():
    reqs = load_requests(CF)
    assert len(reqs) == 10000
    r = reqs[0]
    assert (r["case_id"], r["subject"], r["target_new"], r["ground_truth"]) == (0, "Danielle Darrieux", "English", "French")
    assert r["locality"]["neighborhood"]["prompt"] == ["Michel Rocard is a native speaker of"]
    assert all(x["subject"] in x["prompt"] for x in reqs)
    assert load_requests(CF.with_name("counterfact-edit-1k.json"), n=5)[4]["case_id"] == load_counterfact(
        CF.with_name("counterfact-edit-1k.json"))[4]["case_id"]


@pytest.mark.skipif(not ZSRE.is_file(), reason=f"{ZSRE} not present")
def test_real_zsre_file():
    reqs = load_requests(ZSRE)
    assert len(reqs) == 1037  # no record of this file has an empty alt
    r = reqs[0]
    assert (r["prompt"], r["target_new"], r["ground_truth"]) == (
        "When was the inception of IAAF Combined Events Challenge?", "2006", "1998")
    assert r["portability"]["one_hop"]["ground_truth"] == ["Athletics"]
    assert all(x["locality"]["nq"]["prompt"][0].startswith("nq question: ") for x in reqs)
    assert all(x["target_new"] == x["target_new"].strip() for x in reqs)  # 15 had a leading space
    assert reqs[326]["target_new"] == "Delaware River"
