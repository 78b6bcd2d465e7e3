"""Where and in what precision a local model runs.

One place decides the torch device, the weight dtype and the CPU thread count, so the
engine, the benchmark command and the eval suite agree. The rules:

- device: the model spec's `device` wins over `Settings.model_device`; "auto" picks
  CUDA, then Apple MPS, then the CPU. Naming a device that is not there is a
  configuration error, not a silent fallback (a server meant for a GPU should not
  quietly serve at CPU speed).
- dtype: the spec's `dtype` wins; "auto" is float32 on the CPU (bf16 matmuls are slow
  on most CPUs and fp16 ones worse), bfloat16 on CUDA where the card supports it and
  float16 otherwise, float16 on MPS.
- threads: `Settings.torch_threads` sets torch's intra-op pool. Unset, a CPU model on a
  small machine (4 cores or fewer) leaves one core to the event loop, the HTTP server
  and tokenization: torch's pool synchronises its threads at every op, so when another
  thread or process takes one of its cores every op waits for it. On the 2-core dev
  machine, with one core busy elsewhere, a 32-token prefill took 0.4-0.9 s on two
  threads and 35 ms on one; the engine at 16 concurrent streams was 12-20% faster on
  one thread, single requests as fast. Larger machines keep torch's default.
"""

from __future__ import annotations

import gc
import os

import torch

from server.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(requested: str | None) -> torch.device:
    """The torch device for "auto" / "cpu" / "cuda" / "mps" (or "cuda:1")."""
    name = (requested or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if name == "mps" and not _mps_available():
        raise ConfigError("device 'mps' requested but Apple MPS is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """The weight dtype: an explicit choice wins, "auto" follows the device."""
    name = (requested or "auto").lower()
    if name != "auto":
        if name not in _DTYPES:
            raise ConfigError(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


SMALL_MACHINE_CORES = 4


def configure_threads(threads: int | None, device: torch.device | None = None) -> int:
    """Set torch's intra-op thread count (process-wide); return the count in effect.

    `threads` (from the settings) wins; otherwise see the module docstring."""
    if threads and threads > 0:
        wanted = threads
    elif device is not None and device.type == "cpu":
        cores = os.cpu_count() or 1
        wanted = max(1, cores - 1) if cores <= SMALL_MACHINE_CORES else torch.get_num_threads()
    else:
        return torch.get_num_threads()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def release_memory(device: torch.device | None) -> None:
    """Give freed tensors back: collect cycles, then empty the accelerator's allocator."""
    gc.collect()
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device is not None and device.type == "mps" and _mps_available():
        torch.mps.empty_cache()
