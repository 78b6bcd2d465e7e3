"""Settings: every field documented, env prefix and the original aliases work."""

import json
import re
from pathlib import Path

from server.config import Settings, load_models_config

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def test_every_setting_is_documented_in_env_example():
    text = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^(LLMCTL_[A-Z_]+)=", text, flags=re.M))
    expected = {f"LLMCTL_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected
    # each one has a comment line right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("LLMCTL_") and "=" in line:
            j = i - 1
            while lines[j].startswith("LLMCTL_"):
                j -= 1
            assert lines[j].startswith("# "), line


def test_prefix_and_original_aliases(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path))
    monkeypatch.setenv("MODEL_DEVICE", "cuda")
    monkeypatch.setenv("REDIS_ENABLED", "true")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/1")
    s = Settings()
    assert s.model_device == "cuda"
    assert s.redis_active_url == "redis://127.0.0.1:6390/1"
    assert s.sqlalchemy_url == f"sqlite:///{tmp_path / 'llmctl.db'}"


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("LLMCTL_DEFAULT_RPM=42\nLLMCTL_CACHE_SCOPE=key\n")
    s = Settings()
    assert (s.default_rpm, s.cache_scope) == (42, "key")


def test_single_model_mode(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_MODEL", "microsoft/phi-2")
    cfg = load_models_config(Settings())
    assert [m.id for m in cfg.models] == ["microsoft/phi-2"]
    assert cfg.default_model == "microsoft/phi-2"


def test_models_list_reflects_yaml(cli, tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "default_model: phi-2\n"
        "models:\n"
        "  - id: microsoft/phi-2\n    name: phi-2\n    type: local\n    device: cuda\n"
        "    dtype: float16\n    max_context: 2048\n    revision: main\n"
        "  - id: llama3\n    type: remote\n    base_url: http://gpu-box:8000\n    api: openai\n"
        "    api_key_env: GPU_BOX_KEY\n    timeout: 30\n"
    )
    data = json.loads(cli("models", "list", "--json").output)
    assert data["default_model"] == "phi-2"
    first, second = data["models"]
    assert (first["id"], first["name"], first["device"], first["dtype"], first["max_context"],
            first["revision"]) == ("microsoft/phi-2", "phi-2", "cuda", "float16", 2048, "main")
    assert (second["type"], second["base_url"], second["api_key_env"], second["timeout"],
            second["name"]) == ("remote", "http://gpu-box:8000", "GPU_BOX_KEY", 30.0, "llama3")


def test_env_example_as_dotenv_gives_the_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"LLMCTL_{name.upper()}", raising=False)
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text())
    assert Settings() == Settings(_env_file=None)


def test_redis_switches(monkeypatch):
    for var in ("REDIS_URL", "REDIS_ENABLED", "LLMCTL_REDIS_URL", "LLMCTL_REDIS_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    assert Settings(_env_file=None).redis_active_url is None
    monkeypatch.setenv("LLMCTL_REDIS_URL", "redis://r:1/0")
    assert Settings(_env_file=None).redis_active_url == "redis://r:1/0"
    monkeypatch.setenv("REDIS_ENABLED", "false")
    assert Settings(_env_file=None).redis_active_url is None
    monkeypatch.delenv("LLMCTL_REDIS_URL")
    monkeypatch.setenv("REDIS_ENABLED", "true")
    assert Settings(_env_file=None).redis_active_url == "redis://localhost:6379/0"
