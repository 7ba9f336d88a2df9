"""Run every retention suite before and after editing: ``prepare(base)`` once, ``measure(model)`` per edit.

``prepare`` selects the known facts, captures the base model's next-token distributions for KL,
tokenises the WikiText windows and caches every "pre" score; ``measure`` scores a (possibly
edited) model and reports, per suite, ``pre``, ``post``, ``ratio`` = post / pre, direction,
protocol and time. MMLU / GSM8K stay out of ``measure`` when the base model is not above chance
(``drop_below_chance``), since retention of a skill the model never had means nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from mixsd_edit.evaluation.retention import (RETENTION_PROTOCOLS, capture_reference_logprobs, known_fact_recall,
                                             mean_kl, perplexity, retention_ratio, select_known_facts,
                                             wikitext_windows)
from mixsd_edit.evaluation.retention_tasks import gsm8k_accuracy, mmlu_accuracy
from mixsd_edit.prompting import PromptFormat

logger = logging.getLogger(__name__)

SUITES = ("known_facts", "perplexity", "kl", "mmlu", "gsm8k")
# file names under the shared data root (the folder layout of ../shared/data)
_DATA_FILES = {"known_facts_path": "known_1000/known_1000.json", "wikitext_path": "wikitext2/wiki.test.raw",
               "mmlu_path": "general_eval_glue_ume/mmlu.json", "gsm8k_test_path": "gsm8k/test.jsonl",
               "gsm8k_train_path": "gsm8k/train.jsonl"}


@dataclass(frozen=True)
class RetentionConfig:
    """Data paths (None: that suite is skipped) and sizes. At these defaults SmolLM2-135M on a busy
    2-core CPU with torch.set_num_threads(1) took, prepare / measure: known facts 30 s / 7 s,
    perplexity 7 / 5 s, KL 4 / 2 s, MMLU 63 / 63 s, GSM8K 179 / 198 s. Under CPU contention use one
    thread: two threads made the same greedy decoding ~6-20x slower."""
    known_facts_path: str | None = None
    wikitext_path: str | None = None
    mmlu_path: str | None = None
    gsm8k_test_path: str | None = None
    gsm8k_train_path: str | None = None
    known_n: int = 200            # known_1000 records checked on the base model
    known_max_new_tokens: int = 8
    known_match: str = "prefix"   # or "contains" (ASSETS.md's 51/200 for SmolLM2; "prefix" gives 45/200)
    ppl_windows: int = 4          # perplexity: the last ppl_windows x ppl_window tokens of the file
    ppl_window: int = 512
    kl_windows: int = 4           # KL: the kl_windows x kl_window tokens just before the perplexity text
    kl_window: int = 256
    # From the end of the file: ROME/MEMIT/whitened MixSD estimate their key statistics from the start
    # of the same WikiText-2 file (mom2_dataset), so text from its start would be text those methods
    # were fitted to keep. False reproduces the earlier runs (windows from the start).
    wikitext_from_end: bool = True
    kl_top_k: int | None = 1000
    mmlu_n: int = 100
    mmlu_shots: int = 3
    gsm8k_n: int = 50
    gsm8k_shots: int = 4
    gsm8k_max_new_tokens: int = 160
    batch_size: int = 8
    drop_below_chance: bool = True
    suites: tuple[str, ...] = SUITES
    known_format: PromptFormat = field(default_factory=PromptFormat)

    def __post_init__(self):
        unknown = set(self.suites) - set(SUITES)
        if unknown:
            raise ValueError(f"unknown retention suite(s) {sorted(unknown)}; known: {SUITES}")

    @classmethod
    def from_data_root(cls, root: str | Path, **overrides) -> "RetentionConfig":
        """Paths from a folder laid out like the shared data folder; files that are absent stay None."""
        paths = {k: str(Path(root) / rel) for k, rel in _DATA_FILES.items() if (Path(root) / rel).is_file()}
        return replace(cls(**paths), **overrides)

    def enabled(self, suite: str) -> bool:
        need = {"known_facts": ("known_facts_path",), "perplexity": ("wikitext_path",), "kl": ("wikitext_path",),
                "mmlu": ("mmlu_path",), "gsm8k": ("gsm8k_test_path", "gsm8k_train_path")}[suite]
        return suite in self.suites and all(getattr(self, k) for k in need)


class RetentionSuite:
    """``prepare(base_model)`` once, then ``measure(model, exclude_subjects)`` after each edit."""

    def __init__(self, tok, config: RetentionConfig):
        self.tok, self.config = tok, config
        self.pre: dict[str, dict[str, Any]] = {}
        self.active: list[str] = []
        self.skipped: dict[str, str] = {}
        self._known: list[dict[str, Any]] = []
        self._ppl_windows: list[list[int]] = []
        self._reference = None

    def _run(self, suite: str, model, exclude_subjects=()) -> dict[str, Any]:
        c, tok, bs = self.config, self.tok, self.config.batch_size
        if suite == "known_facts":
            return known_fact_recall(model, tok, self._known, exclude_subjects, c.known_format,
                                     c.known_max_new_tokens, bs, c.known_match)
        if suite == "perplexity":
            return perplexity(model, tok, self._ppl_windows, bs)
        if suite == "kl":
            return mean_kl(model, tok, self._reference, bs)
        if suite == "mmlu":
            return mmlu_accuracy(model, tok, c.mmlu_path, c.mmlu_n, c.mmlu_shots, batch_size=bs)
        return gsm8k_accuracy(model, tok, c.gsm8k_test_path, c.gsm8k_train_path, c.gsm8k_n, c.gsm8k_shots,
                              c.gsm8k_max_new_tokens, bs)

    def prepare(self, base_model) -> dict[str, dict[str, Any]]:
        """Select known facts, capture reference distributions, cache pre scores (on the UNEDITED model)."""
        c, tok = self.config, self.tok
        self.pre, self.active, self.skipped = {}, [], {}
        for suite in SUITES:
            if not c.enabled(suite):
                self.skipped[suite] = "not requested or data path missing"
                continue
            t0 = time.perf_counter()
            if suite == "known_facts":
                sel = select_known_facts(base_model, tok, c.known_facts_path, c.known_n, c.known_format,
                                         c.known_max_new_tokens, c.batch_size, c.known_match)
                self._known = sel.pop("facts")
                result = dict(sel, score=1.0 if self._known else None, base_share_known=sel["score"])
            elif suite == "kl":
                windows = wikitext_windows(tok, c.wikitext_path, c.kl_windows, c.kl_window,
                                           offset_tokens=c.ppl_windows * c.ppl_window, from_end=c.wikitext_from_end)
                self._reference = capture_reference_logprobs(base_model, tok, windows, c.kl_top_k, c.batch_size)
                result = {"score": 0.0, "n": sum(len(w) for w in self._reference.input_ids),
                          "protocol": RETENTION_PROTOCOLS["kl"], "higher_is_better": False}
            else:
                if suite == "perplexity":
                    self._ppl_windows = wikitext_windows(tok, c.wikitext_path, c.ppl_windows, c.ppl_window,
                                                         from_end=c.wikitext_from_end)
                result = self._run(suite, base_model)
            result["seconds"] = time.perf_counter() - t0
            self.pre[suite] = result
            if c.drop_below_chance and result.get("above_chance") is False:
                self.skipped[suite] = (f"base model not above chance: {result['score']:.3f} vs chance "
                                       f"{result['chance']:.3f} (p={result['p_value']:.3f})")
            elif suite == "known_facts" and not self._known:
                self.skipped[suite] = "the base model answers none of the checked facts"
            else:
                self.active.append(suite)
            logger.info("retention prepare %s: %s in %.1fs", suite, result.get("score"), result["seconds"])
        return self.pre

    def measure(self, model, exclude_subjects: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """Post scores of every active suite with their pre scores and ratios. ``exclude_subjects``
        (the edited subjects) leaves those facts out of known-fact recall; its pre score on the
        remaining facts is 1.0 by construction."""
        if not self.pre:
            raise RuntimeError("call prepare(base_model) on the unedited model before measure()")
        exclude_subjects = list(exclude_subjects)
        out: dict[str, dict[str, Any]] = {}
        for suite in self.active:
            t0 = time.perf_counter()
            post = self._run(suite, model, exclude_subjects)
            pre_score = self.pre[suite]["score"]
            out[suite] = {"pre": pre_score, "post": post["score"], "ratio": retention_ratio(pre_score, post["score"]),
                          "higher_is_better": post["higher_is_better"], "n": post["n"], "protocol": post["protocol"],
                          "seconds": time.perf_counter() - t0, "details": post}
            logger.info("retention measure %s: pre %s post %s in %.1fs", suite, pre_score, post["score"],
                        out[suite]["seconds"])
        return out
