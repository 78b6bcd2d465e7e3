"""The benchmarks, one module each; `get_task(name)` looks one up."""

from __future__ import annotations

from evalsuite.tasks.base import Item, Request, Sample, Source, Task, TaskOptions
from evalsuite.tasks.gsm8k import GSM8K
from evalsuite.tasks.mbpp import MBPP
from evalsuite.tasks.mmlu import MMLU
from evalsuite.tasks.summarization import Summarization
from evalsuite.tasks.toxicity import Toxicity
from server.errors import InvalidRequest

TASKS: dict[str, type[Task]] = {t.name: t for t in (GSM8K, MMLU, MBPP, Summarization, Toxicity)}

__all__ = ["TASKS", "Item", "Request", "Sample", "Source", "Task", "TaskOptions", "get_task"]


def get_task(name: str, options: TaskOptions | None = None) -> Task:
    try:
        cls = TASKS[name]
    except KeyError:
        raise InvalidRequest(f"unknown task {name!r}; choose one of {', '.join(TASKS)}",
                             param="task") from None
    return cls(options or TaskOptions())
