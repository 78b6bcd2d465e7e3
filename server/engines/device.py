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
- threads: `Settings.torch_threads` sets torch's intra-op pool; unset, torch's own
  default (one thread per core) stays. An earlier rule left one core free on machines
  of 4 cores or fewer; it was tuned on a 2-core machine busy with other jobs, and on
  the same machine quiet it cost a third of the throughput (16 streams on the small
  test model: 334 tok/s on one thread, 491 on two, bench/RESULTS.md). A server that
  shares its cores with other work can still set fewer threads.
"""

from __future__ import annotations

import gc

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


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (process-wide) when `threads` (from the
    settings) asks for one; return the count in effect."""
    if threads and threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def release_memory(device: torch.device | None) -> None:
    """Give freed tensors back: collect cycles, then empty the accelerator's allocator."""
    gc.collect()
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device is not None and device.type == "mps" and _mps_available():
        torch.mps.empty_cache()
