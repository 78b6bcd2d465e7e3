"""The one interface tasks reach models through, and how a model is chosen.

`EvalModel.loglikelihood` and `EvalModel.generate` take a list of requests and
yield results in batches as they finish, as `(request index, result)` pairs, so
the runner can save progress and move the progress bar while a run goes on.
Implementations: `HFModel` (evalsuite/hf_model.py: a local transformers model,
batched forward passes and batched greedy generation that match
lm-evaluation-harness's `hf` model) and `OpenAIModel` (evalsuite/remote_model.py:
any OpenAI-compatible server: a remote model from models.yaml, or a running llmctl
gateway with `--through`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evalsuite.tasks.base import Request
from server.config import ModelSpec, Settings, load_models_config
from server.errors import ConfigError, InvalidRequest, ModelNotFound

LLResult = tuple[float, bool]  # (sum of continuation logprobs, continuation is greedy)


class LoglikelihoodUnsupported(InvalidRequest):
    code = "loglikelihood_unsupported"


class ItemError(str):
    """The answer to a request the server refused on its own (a 400 for this prompt):
    scored as an empty answer, its message stored with the sample, and the run goes on."""

    message: str

    def __new__(cls, message: str) -> ItemError:
        obj = super().__new__(cls, "")
        obj.message = message
        return obj


class EvalModel(ABC):
    name: str
    chat_only: bool = False  # offers chat completions only (no raw prompts)

    @abstractmethod
    def loglikelihood(self, requests: list[Request]) -> Iterator[list[tuple[int, LLResult]]]:
        ...

    @abstractmethod
    def generate(self, requests: list[Request]) -> Iterator[list[tuple[int, str]]]:
        ...

    def check_loglikelihood(self) -> None:  # noqa: B027 - optional hook
        """Raise LoglikelihoodUnsupported when the model cannot score a continuation."""

    def describe(self) -> dict:
        return {"name": self.name}

    def identity(self) -> dict:
        """What makes results comparable (part of a run's fingerprint for resuming)."""
        return self.describe()

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


@dataclass
class ModelChoice:
    """Which model to evaluate and how to reach it, checked before anything loads."""

    kind: str  # local | remote | through
    name: str | None
    spec: ModelSpec | None = None
    url: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None  # remote/through: to truncate prompts as lm-eval does

    @property
    def label(self) -> str:
        """The opened model's name (what stored runs record as their model)."""
        if self.kind == "through":
            return f"{self.name or 'default'} via {self.url}"
        return self.spec.name


def resolve_model(settings: Settings, *, name: str | None = None, config: Path | None = None,
                  through: str | None = None, api_key: str | None = None,
                  tokenizer: str | None = None) -> ModelChoice:
    """NAME from models.yaml, or NAME through a gateway URL; raises for bad input."""
    if through:
        key = api_key or settings.api_key
        if not key:
            raise InvalidRequest("--through needs --api-key KEY (or LLMCTL_API_KEY)",
                                 param="api_key")
        return ModelChoice("through", name, url=through, api_key=key, tokenizer=tokenizer)
    models = load_models_config(settings, config)
    spec = models.find(name)
    if spec is None:
        if not models.models:
            raise ConfigError("no models configured: pass --config models.yaml or set "
                              "LLMCTL_MODEL (or use --through URL --api-key KEY)")
        raise ModelNotFound(f"model {name!r} is not configured (configured: "
                            f"{', '.join(models.names)})", param="model")
    if spec.type == "remote":
        key = spec.api_key
        if spec.api_key_env and not key:
            raise ConfigError(f"model {spec.name}: environment variable {spec.api_key_env} "
                              "(its api_key_env) is not set")
        return ModelChoice("remote", spec.name, spec=spec, api_key=key,
                           tokenizer=tokenizer or spec.tokenizer)
    return ModelChoice("local", spec.name, spec=spec)


def open_model(settings: Settings, choice: ModelChoice, *,
               batch_size: int | None = None) -> EvalModel:
    """Load (local) or connect to (remote, through) the chosen model."""
    if choice.kind == "through":
        from evalsuite.remote_model import OpenAIModel

        return OpenAIModel(choice.url, choice.name, api_key=choice.api_key,
                           concurrency=batch_size or 8, tokenizer=choice.tokenizer,
                           label=choice.label)
    spec = choice.spec
    if choice.kind == "remote":
        from evalsuite.remote_model import OpenAIModel

        return OpenAIModel(spec.base_url, spec.id, api_key=choice.api_key, timeout=spec.timeout,
                           concurrency=batch_size or spec.max_batch_size, label=spec.name,
                           tokenizer=choice.tokenizer, max_context=spec.max_context)
    from evalsuite.hf_model import HFModel

    return HFModel(spec.source, name=spec.name, revision=spec.revision,
                   device=spec.device or settings.model_device, dtype=spec.dtype,
                   max_length=spec.max_context, batch_size=batch_size or 8,
                   threads=settings.torch_threads)
