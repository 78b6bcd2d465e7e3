"""Bad input: one readable line, no traceback, no password, a non-zero exit code."""

import pytest

SECRET_PW = "s3cr3t-pw"


@pytest.mark.parametrize("args,expected,code", [
    (["keys", "create", "--name", "a", "--expires", "soon"], "expires", 2),
    (["keys", "create", "--name", "a", "--expires", "0d"], "expires", 2),
    (["keys", "create", "--name", "a", "--role", "root"], "role", 2),
    (["keys", "create", "--name", "a", "--rpm", "-1"], "rpm", 2),
    (["keys", "show", "nobody"], "nobody", 4),
    (["models", "create-test-model", "x", "--size", "huge"], "size", 2),
])
def test_cli_bad_input(cli, args, expected, code):
    result = cli(*args)
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output


def test_duplicate_name(cli):
    assert cli("keys", "create", "--name", "dup").exit_code == 0
    result = cli("keys", "create", "--name", "dup")
    assert result.exit_code == 1 and "dup" in result.output


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://llmctl:{SECRET_PW}@127.0.0.1:1/llmctl",
    f"postgresql+nodriver://llmctl:{SECRET_PW}@127.0.0.1/x",
    f"::not a url {SECRET_PW}",
])
def test_unreachable_or_invalid_database(cli, url):
    result = cli("keys", "list", env={"LLMCTL_DATABASE_URL": url})
    assert result.exit_code != 0
    assert SECRET_PW not in result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "database" in lines[0]


@pytest.mark.parametrize("content,expected", [
    ("models: [", "not valid YAML"),
    ("models:\n  - id: a\n    type: remote\n", "models[0] (a)"),
    ("models:\n  - id: a\n    max_new_tokens: -3\n", "max_new_tokens"),
    ("models:\n  - id: a\n    colour: red\n", "colour"),
    ("default_model: b\nmodels:\n  - id: a\n", "default_model"),
    ("- a\n- b\n", "mapping"),
])
def test_malformed_models_yaml(cli, tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = cli("models", "list", "--config", str(path))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert str(path) in lines[0].replace("\n", "") and expected in lines[0]
