"""How a request's text becomes model input: plain completion or the model's chat template.

The same :class:`PromptFormat` is used to build training targets and to score them, so a method
and its evaluation can never disagree on where the answer starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptFormat:
    use_chat_template: bool = False
    system_prompt: str | None = None

    def context(self, tok, text: str) -> str:
        """The text after which the model's answer begins."""
        if not self.use_chat_template:
            return text
        if getattr(tok, "chat_template", None) is None:
            raise ValueError("use_chat_template is set but the tokenizer has no chat template")
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        msgs.append({"role": "user", "content": text})
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @property
    def answer_prefix(self) -> str:
        """What separates the context from the answer: a space for cloze prompts, nothing in chat."""
        return "" if self.use_chat_template else " "

    def context_ids(self, tok, text: str) -> list[int]:
        ctx = self.context(tok, text)
        # A chat template already carries its special tokens (BOS included).
        return tok(ctx, add_special_tokens=not self.use_chat_template)["input_ids"]

    def answer_ids(self, tok, answer: str) -> list[int]:
        return tok(self.answer_prefix + answer.strip(), add_special_tokens=False)["input_ids"]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (ids [B, L], attention_mask [B, L]). Right padding leaves every real
    position's causal logits unchanged, so batched scores equal one-at-a-time scores."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id_of(tok) -> int:
    pid = tok.pad_token_id
    if pid is None:
        pid = tok.eos_token_id if tok.eos_token_id is not None else 0
    return int(pid)
