"""Packaging: version ranges in pyproject.toml, exact pins in constraints.txt, optional
extras that say when they are missing, and a non-editable install that works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from server.db import migrate

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_torch_is_a_range_in_pyproject_and_exact_in_the_constraints_file():
    torch, = [r for r in PROJECT["dependencies"] if r.startswith("torch")]
    assert "==" not in torch and ">=" in torch and "<" in torch
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    import torch as installed

    # What `make install` and CI put here is exactly the pin (2.13.0+cpu from local disk).
    assert installed.__version__.split("+")[0] == pins["torch"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[\$\(EXTRAS\)\]'", makefile)
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml constraints\.txt$", makefile,
                     re.M)


def test_serving_needs_no_extra_and_the_tests_get_every_extra():
    core = requirement_names(PROJECT["dependencies"])
    extras = {name: requirement_names(reqs) for name, reqs in
              PROJECT["optional-dependencies"].items()}
    assert extras["eval"] == {"datasets", "rouge-score"} and extras["bench"] == {"matplotlib"}
    assert not core & (extras["eval"] | extras["bench"] | extras["dev"])
    assert "evaluate" not in core.union(*extras.values())  # never imported
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS\s+\?= eval,bench,dev$", makefile, re.M)
    assert PROJECT["license"] == "Apache-2.0"  # an SPDX string, not the deprecated table


def test_evaluate_is_imported_nowhere():
    pattern = re.compile(r"^\s*(import evaluate|from evaluate\b)", re.M)
    for package in ("llmctl", "server", "evalsuite", "bench", "tests"):
        for path in (ROOT / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), path


def test_eval_without_the_eval_extra_says_which_extra_to_install(tiny_models_yaml, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → not installed
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path))
    result = CliRunner().invoke(app, [
        "eval", "gsm8k", "--config", tiny_models_yaml, "--limit", "1",
        "--data", str(ROOT / "evalsuite" / "fixtures" / "gsm8k")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1] == ("error: loading evaluation data needs datasets, which the 'eval' "
                         "extra installs: pip install 'llmctl[eval]'")
    assert "Traceback" not in result.output


def test_plot_without_the_bench_extra_says_which_extra_to_install(tmp_path, monkeypatch):
    from llmctl.benchmarking.plot import plot_serve
    from server.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"pip install 'llmctl\[bench\]'$"):
        plot_serve({"levels": []}, tmp_path / "x.png")


def test_a_non_editable_install_carries_the_migrations(tmp_path):
    """What the image does (`pip install .`): the wheel holds migrations/, so `db upgrade`
    works from site-packages; and building it warns about no license table."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("llmctl", "server", "evalsuite", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "project.license` as a TOML table is deprecated" not in built.stdout + built.stderr
    wheel, = (tmp_path / "dist").glob("llmctl-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "LLMCTL_HOME": str(tmp_path / "home")}
    env.pop("LLMCTL_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-c", "import llmctl.cli, sys; print(llmctl.__file__);"
                           " sys.argv = ['llmctl', 'db', 'upgrade', '--json']; llmctl.cli.main()"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, answer = done.stdout.split("\n", 1)
    assert where.startswith(str(site))
    assert f'"revision": "{migrate.head_revision()}"' in answer
