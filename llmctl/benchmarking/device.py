"""Raw model throughput on a device: prefill and decode tokens/s per batch size.

Plain Hugging Face forward passes with a `DynamicCache` under
`torch.inference_mode` — no engine, no scheduler, no HTTP — so the figures are the
ceiling the serving stack is measured against. For each batch size B:

- prefill: one forward pass over B random prompts of `prompt_len` tokens;
  prefill tokens/s = B * prompt_len / its time.
- decode: `gen_len` greedy one-token steps on the cache the prefill left;
  decode tokens/s = B * gen_len / their time.
- peak memory: `torch.cuda.max_memory_allocated` on CUDA, the highest
  `torch.mps.current_allocated_memory` seen on MPS, and on CPU the process's peak
  resident set (reset per batch size through /proc/self/clear_refs on Linux,
  otherwise the lifetime peak from getrusage).

Device, dtype and CPU threads are chosen by server/engines/device.py, as for the
engine that serves the model.
"""

from __future__ import annotations

import inspect
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.config import ModelSpec, Settings
from server.engines.device import (
    configure_threads,
    release_memory,
    resolve_device,
    resolve_dtype,
)
from server.errors import ConfigError, InvalidRequest


@dataclass
class DeviceConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    prompt_len: int = 128
    gen_len: int = 64
    device: str | None = None  # None: the model's device from models.yaml, else settings
    seed: int = 0


class _Memory:
    """Peak memory of one measured section, in bytes, by the device's own measure."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif device.type == "mps":
            self.kind = "mps_allocated"
        elif os.path.exists("/proc/self/clear_refs"):
            self.kind = "process_rss_peak"
        else:
            self.kind = "process_rss_peak_lifetime"

    def reset(self) -> None:
        self.peak = 0
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_rss_peak":
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux 4.0+)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.kind = "process_rss_peak_lifetime"

    def sample(self) -> None:
        if self.kind == "mps_allocated":
            self.peak = max(self.peak, torch.mps.current_allocated_memory())

    def read(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "mps_allocated":
            return self.peak
        if self.kind == "process_rss_peak":
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def load_model(spec: ModelSpec, device, dtype):
    """The model from its directory or hub id; a failure is a configuration error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is on screen
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.source, revision=spec.revision,
                                                     dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load model {spec.name!r} from {spec.source}: {first}") from None
    return model.to(device).eval()


class DeviceBench:
    """Measures one loaded model at several batch sizes."""

    def __init__(self, model, device, config: DeviceConfig):
        self.model = model
        self.device = device
        self.config = config
        self.memory = _Memory(device)
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Logits for the last position only, as a serving engine asks for them.
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, input_ids, cache):
        return self.model(input_ids=input_ids, use_cache=True,
                          **{self._cache_arg: cache}, **self._extra)

    def _prompts(self, batch_size: int, length: int):
        vocab = self.model.config.vocab_size
        generator = torch.Generator().manual_seed(self.config.seed + batch_size)
        # Skip the lowest ids, where the special tokens usually live.
        low = min(16, vocab - 1)
        ids = torch.randint(low, vocab, (batch_size, length), generator=generator)
        return ids.to(self.device)

    def run_one(self, batch_size: int, prompt_len: int, gen_len: int) -> dict:
        from transformers import DynamicCache

        input_ids = self._prompts(batch_size, prompt_len)
        _sync(self.device)
        self.memory.reset()
        cache = DynamicCache(config=self.model.config)
        start = time.perf_counter()
        out = self._forward(input_ids, cache)
        next_ids = out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        prefill_s = time.perf_counter() - start
        self.memory.sample()
        start = time.perf_counter()
        for _ in range(gen_len):
            out = self._forward(next_ids, cache)
            next_ids = out.logits[:, -1:].argmax(-1)
            self.memory.sample()
        _sync(self.device)
        decode_s = time.perf_counter() - start
        peak = self.memory.read()
        del cache, out
        release_memory(self.device)
        return {
            "batch_size": batch_size,
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": batch_size * prompt_len / prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": batch_size * gen_len / decode_s,
            "decode_step_ms": decode_s / gen_len * 1000.0,
            "peak_memory_mb": peak / 2**20,
        }

    def run(self, on_batch: Callable[[int], None] | None = None) -> list[dict]:
        cfg = self.config
        results = []
        with torch.inference_mode():
            self.run_one(1, cfg.prompt_len, 4)  # warm-up: kernels, allocator, thread pool
            for batch_size in cfg.batch_sizes:
                if on_batch:
                    on_batch(batch_size)
                results.append(self.run_one(batch_size, cfg.prompt_len, cfg.gen_len))
        return results


def run_device_bench(spec: ModelSpec, settings: Settings, config: DeviceConfig,
                     on_batch: Callable[[int], None] | None = None) -> dict:
    """Load `spec` on the chosen device, measure every batch size, return the JSON document."""
    if spec.type != "local":
        raise InvalidRequest(f"model {spec.name!r} is remote; `bench device` measures local "
                             "models (use `bench serve` against its server)", param="model")
    if config.prompt_len <= 0 or config.gen_len <= 0:
        raise InvalidRequest("--prompt-len and --gen-len must be positive")
    configure_threads(settings.torch_threads)
    device = resolve_device(config.device or spec.device or settings.model_device)
    dtype = resolve_dtype(spec.dtype, device)
    start = time.perf_counter()
    model = load_model(spec, device, dtype)
    load_s = time.perf_counter() - start
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and config.prompt_len + config.gen_len > limit:
        raise InvalidRequest(f"--prompt-len + --gen-len ({config.prompt_len + config.gen_len}) "
                             f"exceeds the model's {limit} positions")
    bench = DeviceBench(model, device, config)
    results = bench.run(on_batch)
    return {
        "benchmark": "device",
        "model": spec.name,
        "source": spec.source,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_len": config.prompt_len,
        "gen_len": config.gen_len,
        "load_s": load_s,
        "memory_measure": bench.memory.kind,
        "machine": machine_info(device),
        "results": results,
    }


def machine_info(device) -> dict:
    """What the figures were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
