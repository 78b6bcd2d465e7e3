"""Request and response models for the three API surfaces.

Fields follow the OpenAI reference order (https://platform.openai.com/docs/api-reference),
extras grouped at the end as vLLM's protocol.py does. Unknown fields are ignored,
as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Stop = str | list[str] | None


def _stops(value: Stop) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("stop", check_fields=False)
    @classmethod
    def _check_stop(cls, value: Stop) -> Stop:
        stops = _stops(value)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return _stops(getattr(self, "stop", None))


class StreamOptions(BaseModel):
    include_usage: bool = False


# --- /v1/generate (llmctl's own API)


class GenerateRequest(_Request):
    prompt: str = Field(min_length=1)
    model: str | None = None
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = Field(default=0, ge=-1)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    # llmctl: false skips the completion cache for this request (lookup and store).
    cache: bool = True
    # One text per request: a client asking for several choices is refused (400) rather
    # than silently given one; /v1/completions has `n`.
    n: int = Field(default=1, ge=1, le=1, description="Must be 1; /v1/completions has n.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    created: int
    model: str
    text: str
    finish_reason: str
    usage: Usage
    request_id: str


# --- /v1/completions (OpenAI)


class CompletionRequest(_Request):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: str | None = None
    # vLLM extras
    top_k: int = Field(default=0, ge=-1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if all(isinstance(p, list) for p in value) and any(not p for p in value):
                raise ValueError("token-id prompts must not be empty")
        elif not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt in a batch: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


# --- /v1/chat/completions (OpenAI)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    response_format: dict | None = None
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = 1.0
    tool_choice: str | dict | None = None
    tools: list[dict] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: TopP = 1.0
    user: str | None = None
    # vLLM extras
    top_k: int = Field(default=0, ge=-1)

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def raw_messages(self) -> list[dict]:
        """The messages as sent (content parts, tool calls and all), for a remote."""
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def passthrough(self) -> dict:
        """The fields llmctl forwards to remote engines without interpreting them."""
        return {f: getattr(self, f) for f in PASSTHROUGH if getattr(self, f) is not None}

    def first_unsupported_by_local(self) -> str | None:
        """The first field a local engine cannot honour: a passthrough field that asks
        for something, or `messages[i].content[j]` for a content part that is not text
        (an image)."""
        for name, value in self.passthrough().items():
            if value != _NO_OP[name]:
                return name
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.get("type") != "text":
                        return f"messages[{i}].content[{j}]"
        return None


# OpenAI chat fields llmctl does not interpret itself (see passthrough), and the
# value of each that asks for nothing (some SDKs always send them).
_NO_OP = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
PASSTHROUGH = tuple(_NO_OP)
