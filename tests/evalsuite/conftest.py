"""Fixtures for the eval suite: the CLI against a fresh home, the project's data
fixtures, a models.yaml on the tiny test model, and a tiny toxicity classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

FIXTURES = Path(__file__).resolve().parents[2] / "evalsuite" / "fixtures"


def _root_app() -> typer.Typer:
    """The real root app; with `eval` mounted on a copy of its error handling if the
    root does not mount it (yet)."""
    from llmctl import cli

    names = {g.name for g in cli.app.registered_groups}
    if "eval" in names:
        return cli.app
    from llmctl.commands import eval as eval_cmd

    root = typer.Typer(cls=cli._Root, pretty_exceptions_enable=False)

    @root.callback()
    def _callback():
        """llmctl (eval only)."""

    root.add_typer(eval_cmd.app, name="eval")
    return root


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def eval_models_yaml(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model as `tiny`, without a context cap (as lm-eval sees it)."""
    path = tmp_path_factory.mktemp("evalcfg") / "models.yaml"
    path.write_text("default_model: tiny\nmodels:\n"
                    f"  - id: test/tiny\n    name: tiny\n    type: local\n"
                    f"    path: {tiny_model_dir}\n    device: cpu\n")
    return str(path)


class Cli:
    def __init__(self, home: Path):
        self.home = home
        self.runner = CliRunner()
        self.app = _root_app()

    def __call__(self, *args: str, env: dict | None = None):
        return self.runner.invoke(self.app, [str(a) for a in args], env=env)

    def json(self, *args: str):
        result = self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture
def cli(tmp_path, monkeypatch) -> Cli:
    """`llmctl` in-process against a fresh home (embedded SQLite)."""
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMCTL_DATABASE_URL", raising=False)
    monkeypatch.delenv("LLMCTL_MODELS_CONFIG", raising=False)
    monkeypatch.delenv("LLMCTL_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    return Cli(tmp_path / "home")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A randomly initialised sequence classifier with labels nothate/hate, saved
    like a hub model (the tokenizer is the tiny test model's)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a spread of scores on both sides of 0.5
        model.classifier.weight.mul_(40.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
