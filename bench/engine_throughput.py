#!/usr/bin/env python
"""LocalEngine throughput, in-process (no HTTP): sequential `generate` vs the engine at 1
and at N concurrent requests, on the `small` test model.

    .venv/bin/python bench/engine_throughput.py                    # builds the model in /tmp
    .venv/bin/python bench/engine_throughput.py --model-dir DIR --requests 32 --concurrency 16

Each request: a prompt of --prompt-len (32) tokens of plain words, --gen-len (64) new
tokens, greedy. Output tok/s = generated tokens / wall time of the level (prefill
included). TTFT is measured on streams (submit -> first delta). Sequential `generate`
and the engine at 1 alternate request by request; both use torch's default thread
count (`generate` in the main thread, the engine in its own). The figures are only
comparable on an otherwise idle machine: other processes on the CPU lower them. The
end-to-end check through the gateway (and against `transformers serve`) is
bench/serve_compare.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llmctl.benchmarking.serve import make_prompts  # noqa: E402
from server.config import ModelSpec, Settings  # noqa: E402
from server.engines.base import Completion, EngineRequest, SamplingParams  # noqa: E402
from server.engines.local import LocalEngine  # noqa: E402


class Generate:
    """Plain transformers `generate`, one prompt at a time: the baseline."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.run("warm up", 4)

    def run(self, prompt: str, gen_len: int) -> tuple[int, float]:
        ids = self.tok(prompt, return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**ids, do_sample=False, max_new_tokens=gen_len)
        return out.shape[1] - ids["input_ids"].shape[1], time.perf_counter() - started


async def engine_level(engine: LocalEngine, prompts: list[str], gen_len: int,
                       concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(p: str) -> None:
        nonlocal tokens
        async with gate:
            started = time.perf_counter()
            first = None
            req = EngineRequest(SamplingParams(max_new_tokens=gen_len, temperature=0.0), prompt=p)
            async for item in engine.stream(req):
                if first is None:
                    first = time.perf_counter() - started
                if isinstance(item, Completion):
                    tokens += item.completion_tokens
            ttfts.append(first)

    before = engine.stats.snapshot()
    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    after = engine.stats.snapshot()
    delta = {k: after[k] - before[k] for k in ("prefill_s", "decode_s", "prefill_chunks",
                                               "decode_steps")}
    return {"concurrency": concurrency, "requests": len(prompts), "tokens": tokens,
            "tok_s": tokens / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "wall_s": wall, **delta}


async def run(model_dir: str, one: list[str], many: list[str], gen_len: int,
              concurrency: int) -> tuple[float, list[dict]]:
    """Sequential generate and the engine at 1 alternate request by request (so that a
    busy neighbour on the CPU hurts both alike), then the engine at `concurrency`."""
    baseline = Generate(model_dir)
    engine = LocalEngine(ModelSpec(id="small", path=model_dir, device="cpu",
                                   max_batch_size=concurrency, max_queue=1024),
                         Settings(model_device="cpu"))
    await engine.start()
    await engine.generate(EngineRequest(SamplingParams(max_new_tokens=4, temperature=0),
                                        prompt="warm up"))
    try:
        gen_tokens = gen_s = 0.0
        single = []
        for p in one:
            n, seconds = baseline.run(p, gen_len)
            gen_tokens, gen_s = gen_tokens + n, gen_s + seconds
            single.append(await engine_level(engine, [p], gen_len, 1))
        level1 = {k: sum(r[k] for r in single) for k in single[0] if k not in (
            "concurrency", "tok_s", "ttft_p50_ms")}
        level1.update(concurrency=1, tok_s=level1["tokens"] / level1["wall_s"],
                      ttft_p50_ms=statistics.median(r["ttft_p50_ms"] for r in single))
        levels = [level1, await engine_level(engine, many, gen_len, concurrency)]
        return gen_tokens / gen_s, levels
    finally:
        await engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32, help="per concurrent level")
    ap.add_argument("--sequential", type=int, default=6, help="requests at 1 (both sides)")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    model_dir = args.model_dir
    if model_dir is None:
        from server.testmodel import create_test_model

        model_dir = str(create_test_model(Path(tempfile.mkdtemp()) / "small", "small"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    one = make_prompts(args.sequential, args.prompt_len, seed=0, salt="one", tokenizer=tok)
    many = make_prompts(args.requests, args.prompt_len, seed=0, salt="many", tokenizer=tok)

    seq, levels = asyncio.run(run(model_dir, one, many, args.gen_len, args.concurrency))
    print(f"sequential generate        : {seq:7.1f} tok/s")
    for lv in levels:
        print(f"engine @ {lv['concurrency']:>2} concurrent      : {lv['tok_s']:7.1f} tok/s "
              f"({lv['tok_s'] / seq:4.2f}x generate), TTFT p50 {lv['ttft_p50_ms']:6.1f} ms, "
              f"{lv['tokens']} tokens / {lv['requests']} requests")
        print(f"    wall {lv['wall_s']:.2f}s: {lv['prefill_chunks']} prefill chunks "
              f"{lv['prefill_s']:.2f}s, {lv['decode_steps']} decode steps {lv['decode_s']:.2f}s "
              f"({1000 * lv['decode_s'] / max(1, lv['decode_steps']):.1f} ms/step)")
    print(f"TTFT p50 ratio {args.concurrency} vs 1: "
          f"{levels[1]['ttft_p50_ms'] / levels[0]['ttft_p50_ms']:.2f}x")


if __name__ == "__main__":
    main()
