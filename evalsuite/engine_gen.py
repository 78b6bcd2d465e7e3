"""Greedy generation for a local eval model through the gateway's continuous-batching
scheduler (server/engines/scheduler.py), on the model the eval already loaded.

lm-eval's `hf` model generates in static batches that run until every row has shown
a stop string, so a batch takes as long as its longest answer. Here each item joins
the running batch when a row frees up and leaves as soon as it stops, so short
answers do not wait for long ones. The text is the same: greedy decoding from the
same (left-truncated) prompt ids, decoded without special tokens and cut at the first
stop string, as lm-eval cuts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from server.engines.base import SamplingParams
from server.engines.local import _eos_ids, _pad_id
from server.engines.scheduler import Scheduler, Sequence


class EngineGenerator:
    """One scheduler thread over `model`; `run` yields finished items as they finish."""

    def __init__(self, model, tokenizer, loop_tokenizer, *, device, max_batch_size: int,
                 name: str):
        import torch

        cpu = torch.device(device).type == "cpu"
        self.scheduler = Scheduler(
            model, loop_tokenizer, device=torch.device(device), max_batch_size=max_batch_size,
            max_queue=1 << 30, eos_ids=_eos_ids(model, tokenizer), pad_id=_pad_id(tokenizer),
            # The server's budgets for its device (LocalEngine.load), but for throughput:
            # nobody waits on a single eval item, so prefill chunks need not be short to
            # bound the decoding rows' stall. On a 2-core CPU, 256-token chunks made
            # prefill of 1,000-token gsm8k prompts 20% slower than 512 or more (bench/).
            prefill_group_tokens=32 if cpu else 4096, prefill_chunk_tokens=1024 if cpu else 4096,
            idle_prefill_tokens=2048 if cpu else 16384, name=name)
        self.scheduler.start()

    def run(self, jobs: list[tuple[int, list[int], int, tuple[str, ...]]]
            ) -> Iterator[list[tuple[int, list[int]]]]:
        """jobs: (index, prompt ids, max new tokens, stop strings) → (index, output ids)."""
        loop = asyncio.new_event_loop()
        waiting: dict[asyncio.Task, tuple[int, Sequence]] = {}
        try:
            seqs = [(index, Sequence(ids, SamplingParams(max_new_tokens=max_new,
                                                         temperature=0.0, stop=stops),
                                     loop=loop)) for index, ids, max_new, stops in jobs]
            if not self.scheduler.submit_all([seq for _, seq in seqs]):
                raise RuntimeError("the generation scheduler refused the items")
            for index, seq in seqs:
                waiting[loop.create_task(seq.queue.get())] = (index, seq)
            while waiting:
                done, _ = loop.run_until_complete(
                    asyncio.wait(list(waiting), return_when=asyncio.FIRST_COMPLETED))
                finished = []
                for task in done:
                    index, seq = waiting.pop(task)
                    item = task.result()
                    if isinstance(item, BaseException):
                        raise item
                    finished.append((index, list(seq.out_ids)))
                yield finished
        finally:
            for task, (_, seq) in waiting.items():
                self.scheduler.cancel(seq)
                task.cancel()
            if waiting:
                loop.run_until_complete(asyncio.gather(*waiting, return_exceptions=True))
            loop.close()

    def close(self) -> None:
        self.scheduler.stop()
