"""What a benchmark is: its data source, how a document becomes requests, and
how the model's answers become scores.

A task turns each document into an `Item`: the prompt the model sees and one or
more `Request`s (a loglikelihood of a continuation, or a generation until a stop
sequence). The runner sends the requests through an `EvalModel` and hands the
answers back to the task, which scores each item (`Sample`) and aggregates the
samples into metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evalsuite import scoring
from evalsuite.sandbox import SandboxConfig
from server.errors import InvalidRequest


@dataclass(frozen=True)
class Source:
    """Where a task's documents come from on the hub, and the columns it needs."""

    path: str  # hub dataset id
    name: str | None  # dataset config
    split: str  # the evaluated split
    fewshot_split: str | None  # the few-shot pool (None: the task brings its own)
    columns: tuple[str, ...]  # columns every document must have

    def describe(self) -> str:
        return f"{self.path}" + (f" ({self.name})" if self.name else "") + f" [{self.split}]"


@dataclass(frozen=True)
class Request:
    """One model call. `continuation` set: its loglikelihood given `context`;
    otherwise greedy generation from `context` until a stop sequence."""

    context: str
    continuation: str | None = None
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256

    @property
    def kind(self) -> Literal["loglikelihood", "generate"]:
        return "loglikelihood" if self.continuation is not None else "generate"


@dataclass
class Item:
    index: int  # position in the evaluated list (stable across resumes)
    doc: dict
    prompt: str
    target: str
    requests: list[Request]
    doc_id: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One scored item: what the results' `samples` and the database hold."""

    index: int
    doc_id: str | None
    prompt: str
    output: str | None
    extracted: str | dict | None
    target: str | None
    scores: dict[str, float]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index": self.index, "doc_id": self.doc_id, "prompt": self.prompt,
                "output": self.output, "extracted": self.extracted, "target": self.target,
                "scores": self.scores, **({"extra": self.extra} if self.extra else {})}


@dataclass
class TaskOptions:
    """Options that change what is evaluated (and so the run's fingerprint)."""

    num_fewshot: int | None = None
    limit: int | None = None
    seed: int = 1234  # lm-eval's default few-shot seed
    max_gen_toks: int | None = None
    allow_code_execution: bool = False
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # how mbpp runs code
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific (--subjects, ...)

    def fingerprint_fields(self) -> dict:
        return {"num_fewshot": self.num_fewshot, "limit": self.limit, "seed": self.seed,
                "max_gen_toks": self.max_gen_toks, "extra": self.extra}


class Task:
    """Base class; one subclass per benchmark under evalsuite/tasks/."""

    name: ClassVar[str]
    title: ClassVar[str]
    source: ClassVar[Source]
    output_type: ClassVar[Literal["loglikelihood", "generate"]]
    metrics: ClassVar[tuple[str, ...]]
    default_num_fewshot: ClassVar[int] = 0
    max_gen_toks: ClassVar[int] = 256  # lm-eval's default
    prompt_doc: ClassVar[str] = ""  # for `eval list` and the README

    def __init__(self, options: TaskOptions):
        self.options = options

    @property
    def num_fewshot(self) -> int:
        k = self.options.num_fewshot
        return self.default_num_fewshot if k is None else k

    @property
    def gen_toks(self) -> int:
        return self.options.max_gen_toks or self.max_gen_toks

    def needs_fewshot_pool(self) -> bool:
        return self.num_fewshot > 0 and self.source.fewshot_split is not None

    def check(self) -> None:
        """Refuse options that cannot work, before any model is loaded."""
        if self.num_fewshot < 0:
            raise InvalidRequest("--num-fewshot must be 0 or more", param="num_fewshot")

    def prepare(self) -> None:
        """Load what scoring needs (a classifier, ...) once the data is known."""

    def build_items(self, docs: list[dict], fewshot_docs: list[dict] | None) -> list[Item]:
        raise NotImplementedError

    def score(self, items: list[Item], answers: list[list[Any]]) -> list[Sample]:
        """Score a batch of items; `answers[i]` holds the results of items[i].requests:
        (loglikelihood, is_greedy) tuples or generated strings."""
        raise NotImplementedError

    def aggregate(self, samples: list[Sample]) -> dict:
        """{"metrics": {name: {"value", "stderr", "n"}}, ...}; the default averages
        each per-item score."""
        return {"metrics": {m: scoring.summarize([s.scores[m] for s in samples])
                            for m in self.metrics}}

    def config(self) -> dict:
        """The settings that define this evaluation, for the results and the README."""
        return {"num_fewshot": self.num_fewshot, "output_type": self.output_type,
                **({"max_gen_toks": self.gen_toks} if self.output_type == "generate" else {})}

    def close(self) -> None:
        pass


def fewshot_block(turns: list[tuple[str, str]], target_delimiter: str = " ",
                  fewshot_delimiter: str = "\n\n") -> str:
    """lm-eval's plain-text rendering of few-shot turns (api/task.py build_qa_turn):
    question, target delimiter, answer, few-shot delimiter."""
    return "".join(f"{q}{target_delimiter}{a}{fewshot_delimiter}" for q, a in turns)
