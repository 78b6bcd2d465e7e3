"""Test models, built once per session with `llmctl models create-test-model`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


def build(directory, size: str = "tiny") -> str:
    from llmctl.cli import app

    result = CliRunner().invoke(app, ["models", "create-test-model", str(directory),
                                      "--size", size])
    assert result.exit_code == 0, result.output
    return str(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_models_yaml(tmp_path_factory, tiny_model_dir) -> str:
    """A models.yaml serving the tiny model as `tiny` (the default)."""
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(
        "default_model: tiny\n"
        "models:\n"
        f"  - id: test/tiny\n    name: tiny\n    type: local\n    path: {tiny_model_dir}\n"
        "    device: cpu\n    max_context: 512\n    max_new_tokens: 256\n"
    )
    return str(path)
