"""Device, dtype and thread resolution for local models."""

from __future__ import annotations

import pytest
import torch

from server.engines import device as dev
from server.errors import ConfigError


def test_cpu_and_auto_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(None) == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto").type == "mps"


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_missing_accelerator_is_a_config_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match=name):
        dev.resolve_device(name)


def test_dtype_rules(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert dev.resolve_dtype("auto", cpu) == torch.float32
    assert dev.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert dev.resolve_dtype("float16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.resolve_dtype("auto", cuda) == torch.float16
    assert dev.resolve_dtype("auto", mps) == torch.float16
    with pytest.raises(ConfigError):
        dev.resolve_dtype("int4", cpu)


def test_threads_from_settings_else_torch_default():
    before = torch.get_num_threads()
    try:
        assert dev.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert dev.configure_threads(None) == 1  # nothing asked: left as it is
        assert dev.configure_threads(0) == 1
        assert dev.configure_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
