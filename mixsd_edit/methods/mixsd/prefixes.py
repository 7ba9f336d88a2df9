"""Context prefixes (hparam ``context_prefixes``): the same edit under a few unrelated openings.

A key-directed change that is only as large as the bare prompt needs (``delta_l2``) can fail as soon
as the subject appears after other text, because the subject's key there is not quite the one the
change was fitted to. ROME and MEMIT fit their changes under short model-written prefixes for this
reason. With ``context_prefixes: k`` MixSD does the same: each request is also trained on its mixed
target after ``k`` openings of ``context_prefix_words`` words taken from the key-statistics text
(ordinary text the editor already holds; never evaluation data). With ``delta: key_rank_one`` the
subject key that sets the change's direction is the mean over the bare and the prefixed contexts
(``context_prefix_key: mean``) or the bare prompt's alone (``bare``: the openings in training only).
The same ``k`` openings are used for every request of a call, so a request's training does not
depend on which other requests share its batch.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

_SENTENCE_START = re.compile(r"(?:^|(?<=[.!?] ))[A-Z]", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?: |$)", re.MULTILINE)


def context_prefixes(text: str, k: int, n_words: int, seed: int) -> list[str]:
    """``k`` openings (seeded, without repeats): the first ``n_words`` words of sentences in ``text``
    (a capital after a line start or a sentence end, up to the next sentence end or line end) that
    have at least that many words, each ending in a full stop. Fewer usable sentences than ``k`` is an
    error that names the setting."""
    if k <= 0:
        return []
    pool: dict[str, None] = {}
    for m in _SENTENCE_START.finditer(text):
        line_end = text.find("\n", m.start())
        line = text[m.start(): len(text) if line_end < 0 else line_end]
        end = _SENTENCE_END.search(line)
        words = (line if end is None else line[: end.start() + 1]).split()
        if len(words) >= n_words:
            opening = " ".join(words[:n_words]).rstrip(",;:-")
            pool[opening if opening[-1] in ".!?" else opening + "."] = None
    if len(pool) < k:
        raise ValueError(f"context_prefixes={k} needs {k} sentences of at least {n_words} words; "
                         f"the text has {len(pool)}")
    return random.Random(seed).sample(sorted(pool), k)


def prefixed_requests(requests: Sequence[dict], prefixes: Sequence[str]) -> list[dict]:
    """Per request (in order), one copy per prefix with ``prompt`` = ``"{prefix} {prompt}"``; the other
    fields are kept, so the naive template and the subject lookup work on the copies unchanged."""
    return [{**r, "prompt": f"{p} {r['prompt']}"} for r in requests for p in prefixes]
