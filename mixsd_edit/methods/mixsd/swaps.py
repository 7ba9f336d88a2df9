"""Subject swaps: the same prompt about someone else (used by ``preserve_swaps`` and ``subject_key_names``).

Names are capitalised word runs taken from ordinary text the editor already holds (the model-sampled
corpus or a plain-text file), never from evaluation data.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

_NAME = re.compile(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+){0,2}\b")
_LEAD = {"The", "A", "An", "In", "On", "At", "Of", "For", "From", "By", "To", "And", "But", "Or", "What", "When",
         "Where", "Who", "Why", "How", "With", "Now", "Even", "If", "This", "That", "These", "Those", "It", "Its",
         "He", "She", "They", "We", "You", "I", "His", "Her", "Their", "Our", "My", "Your", "As", "So", "Then"}


def entity_names(text: str) -> list[str]:
    """Capitalised runs of one to three words (leading function words dropped), in first-seen order,
    without repeats: "The Arctic Ocean" -> "Arctic Ocean". A single word only right after a lower-case
    word ("visited Paris"), so "Then" or "Please" opening a sentence, line or quote is not taken."""
    names: dict[str, None] = {}
    for m in _NAME.finditer(text):
        words = m.group(0).split(" ")
        while words and words[0] in _LEAD:
            words = words[1:]
        if not words:
            continue
        if len(words) == 1:
            before = text[:m.start()].rstrip(" ")
            if not before or not before[-1].islower():
                continue
        names[" ".join(words)] = None
    return list(names)


def swap_pairs(prompts: Sequence[str], subjects: Sequence[str], names: Sequence[str], k: int,
               seed: int, *, what: str = "preserve_swaps") -> list[tuple[str, str]]:
    """Per prompt, ``k`` (swapped prompt, name) pairs: the LAST occurrence of its subject replaced by a
    name drawn without replacement (seeded); names that equal, contain or are contained in any subject
    are never used. A prompt without its subject is an error (the editor checks this before any model
    work); ``what`` names the setting in the error when the text has too few names."""
    lowered = [s.lower() for s in subjects]
    pool = [n for n in names if not any(n.lower() in s or s in n.lower() for s in lowered)]
    if k > 0 and len(pool) < k:
        raise ValueError(f"{what}={k} needs at least {k} names; the text has {len(pool)} usable")
    rng = random.Random(seed)
    out = []
    for i, (prompt, subject) in enumerate(zip(prompts, subjects)):
        at = prompt.rfind(subject) if subject else -1
        if at < 0:
            raise ValueError(f"request {i}: subject {subject!r} does not occur in {prompt!r}, nothing to swap")
        for name in rng.sample(pool, k):
            out.append((prompt[:at] + name + prompt[at + len(subject):], name))
    return out


def swap_prompts(prompts: Sequence[str], subjects: Sequence[str], names: Sequence[str], k: int,
                 seed: int) -> list[str]:
    """The swapped prompts of :func:`swap_pairs` (``k`` per prompt, in order)."""
    return [text for text, _ in swap_pairs(prompts, subjects, names, k, seed)]
