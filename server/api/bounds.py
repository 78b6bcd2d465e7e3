"""Upper bounds on what a request can cost, and usage capped to them.

Admission holds a request's worst case against the key's quota; settling charges
the real count, which must never exceed what was held, or concurrent requests
together spend past the quota (issue 15: a remote that counted more took a
2,000-token quota to 5,472).

- A prompt's bound is its exact count where the gateway has the model's tokenizer
  (every local model; a remote with `tokenizer:` in models.yaml). Otherwise it is
  the prompt's UTF-8 byte count plus `SPECIAL_TOKENS`: byte-level BPE, SentencePiece
  with byte fallback and WordPiece all make at most one token of each byte, and a
  tokenizer adds a few special tokens (BOS, a chat template's markers) of its own.
- A choice's completion is bounded by `max_tokens`.

A backend that reports more than these bounds (a remote's own count) is charged
the bound; the excess is counted in `llmctl_usage_overreported_tokens_total` and
written to the request log (error_type `usage_overreported`).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engines.base import Completion

SPECIAL_TOKENS = 16


def byte_bound(text: str) -> int:
    """At most this many tokens for `text` under any common tokenizer."""
    return len(text.encode("utf-8", "surrogatepass")) + SPECIAL_TOKENS


def hopeless(text: str, context: int | None, longest_token: int | None) -> bool:
    """True when `text` cannot fit in `context` tokens whatever the tokenizer makes of
    it: no token covers more than `longest_token` characters. Decided without encoding,
    so a multi-megabyte prompt is refused at once."""
    return bool(context and longest_token) and len(text) > context * longest_token


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    overreported: int  # what the backend reported beyond the bounds (not charged)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def capped_usage(choices: list[Completion], *, counted_prompt: int, prompt_bounds: list[int],
                 per_prompt: int, max_new_tokens: int) -> Usage:
    """Usage of `choices` (index order, `per_prompt` choices per prompt): each prompt
    once (OpenAI's convention), the gateway's own count where it has one
    (`counted_prompt` > 0), else the backend's, each number capped to its bound."""
    over = 0
    prompt = counted_prompt
    for choice, bound in zip(choices[::per_prompt], prompt_bounds, strict=False):
        over += max(0, choice.prompt_tokens - bound)
        if not counted_prompt:
            prompt += min(choice.prompt_tokens, bound)
    completion = 0
    for choice in choices:
        over += max(0, choice.completion_tokens - max_new_tokens)
        completion += min(choice.completion_tokens, max_new_tokens)
    return Usage(prompt, completion, over)
