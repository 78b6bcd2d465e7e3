"""The model engine interface: what the gateway, the cache and the eval suite call.

A `ModelEngine` turns one request into tokens. Local engines run transformers on
this process's device; remote engines speak HTTP to another server. Both expose the
same small surface, so routes, the cache and evals never care which one answers.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. temperature 0 means greedy."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-N logprobs per generated token; None = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class EngineRequest:
    """One generation. Exactly one of `prompt` (text or token ids) or `messages` is set.

    Local engines render `messages` with the model's chat template; remote engines
    forward them to the remote's chat endpoint.
    """

    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    request_id: str = ""
    echo_logprobs: bool = False  # also return per-token logprobs of the prompt
    # OpenAI chat fields llmctl does not interpret (tools, tool_choice,
    # response_format): only remote engines take them, forwarded unchanged.
    extra: dict | None = None
    # Filled in by the router (server/engines/router.py) for models with replicas or
    # fallbacks: who answered, and how many backend attempts it took.
    served_model: str | None = None
    served_by: str | None = None  # "model/backend"
    attempts: int = 0


@dataclass
class TokenLogprob:
    token: str
    token_id: int | None
    logprob: float | None  # None for the first prompt token (nothing conditions it)
    top: dict[str, float] = field(default_factory=dict)
    offset: int = 0  # character offset of the token in the returned text


@dataclass
class StreamDelta:
    """A piece of output text as it is produced."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[dict] | None = None  # a remote's delta.tool_calls, as sent


@dataclass
class Completion:
    """The finished result of one EngineRequest."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # generated tokens
    prompt_text: str | None = None  # the exact text the model saw (for echo)
    prompt_logprobs: list[TokenLogprob] | None = None  # when echo_logprobs
    ttft_s: float | None = None
    tool_calls: list[dict] | None = None  # a remote's message.tool_calls, as sent


class ModelEngine(ABC):
    """One served model. Implementations must be safe under concurrent calls."""

    model_id: str

    @abstractmethod
    async def start(self) -> None:
        """Load weights / open connections. Idempotent."""

    @abstractmethod
    async def generate(self, request: EngineRequest) -> Completion: ...

    @abstractmethod
    def stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta | Completion]:
        """Yield StreamDelta pieces, then exactly one Completion. Closing the iterator
        (client gone) must stop the generation."""

    async def generate_all(self, requests: list[EngineRequest]) -> list[Completion]:
        """The choices of one API request (several prompts, `n`): admitted as a whole or
        not at all, and when one fails the others are cancelled. This default runs them
        side by side in a TaskGroup (which cancels the rest on the first error)."""
        if len(requests) == 1:
            return [await self.generate(requests[0])]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.generate(r)) for r in requests]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]

    async def stream_all(self, requests: list[EngineRequest]) -> list[AsyncIterator]:
        """One stream per request, admitted as a whole (an engine with a queue raises
        Overloaded here, before any is queued). Closing a stream cancels its request."""
        return [self.stream(r) for r in requests]

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int | None:
        """Token count with the model's own tokenizer; None where unknown (remote).
        Text that already carries its special tokens (a rendered chat template) is
        counted with add_special_tokens=False."""
        return None

    def render_chat(self, messages: list[dict]) -> str | None:
        """The exact text the model sees for `messages`; None where unknown (remote)."""
        return None

    @property
    def max_context(self) -> int | None:
        return None

    @property
    def longest_token(self) -> int | None:
        """The most characters one token of this model's tokenizer covers (None where
        unknown): a prompt longer than this times the context cannot fit."""
        return None

    @property
    def fingerprint(self) -> str | None:
        """Identifies the weights being served where no revision pins them (cache keys)."""
        return None

    @property
    def ready(self) -> bool:
        return True

    async def health(self) -> tuple[bool, str]:
        return (self.ready, "ready" if self.ready else "not loaded")

    @abstractmethod
    async def close(self) -> None: ...
