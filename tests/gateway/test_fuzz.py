"""schemathesis against a live gateway: every operation of /openapi.json, with a user key
and with admin keys, answers no 5xx and nothing its documented schema contradicts
(status codes, content types, headers, bodies).

Operations that change or kill the key they run with (PATCH, DELETE, revoke, rotate)
each get a fresh admin key, so they cannot spoil the other runs. The example count
and the fixed seed keep the test short and repeatable; FUZZ_EXAMPLES and FUZZ_SEED
widen or vary it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")
EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "15")
SEED = os.environ.get("FUZZ_SEED", "20261201")

# (label, key role, which operations); one fresh key per entry.
RUNS = [
    ("user key, every operation", "user", []),
    ("admin key, every operation that leaves its key alone", "admin",
     ["--exclude-method", "PATCH", "--exclude-method", "DELETE",
      "--exclude-path-regex", "/(revoke|rotate)$"]),
    ("admin key, PATCH", "admin", ["--include-method", "PATCH"]),
    ("admin key, DELETE", "admin", ["--include-method", "DELETE"]),
    ("admin key, revoke", "admin", ["--include-path-regex", "/revoke$"]),
    ("admin key, rotate", "admin", ["--include-path-regex", "/rotate$"]),
]


@pytest.fixture
def gateway(live_server_factory, tiny_model_dir, tmp_path):
    """The tiny model with short generations, so that fuzzed generation requests stay
    quick; a few request logs, so the log routes have rows to find."""
    config = tmp_path / "models.yaml"
    config.write_text("models:\n"
                      f"  - id: test/tiny\n    name: tiny\n    path: {tiny_model_dir}\n"
                      "    device: cpu\n    max_context: 64\n    max_new_tokens: 4\n")
    return live_server_factory(str(config))


def _fresh_key(gateway, admin: str, role: str, n: int) -> str:
    reply = httpx.post(f"{gateway.url}/v1/admin/keys", json={"name": f"fuzz-{n}", "role": role},
                       headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert reply.status_code == 201, reply.text
    return reply.json()["secret"]


def test_schemathesis_finds_no_5xx_and_no_schema_violation(gateway, tmp_path):
    admin = gateway.create_key("fuzz-admin", "--role", "admin")
    httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "hello", "max_tokens": 2},
               headers={"Authorization": f"Bearer {admin}"}, timeout=60).raise_for_status()
    failures = []
    for n, (label, role, selection) in enumerate(RUNS):
        key = _fresh_key(gateway, admin, role, n)
        result = subprocess.run(
            [SCHEMATHESIS, "run", f"{gateway.url}/openapi.json", "--checks", CHECKS,
             "-H", f"Authorization: Bearer {key}", "--max-examples", EXAMPLES, "--seed", SEED,
             # One worker: Python 3.11.7's ast.parse is not thread-safe (CPython
             # gh-106905), and hypothesis calls it while describing strategies.
             "--phases", "examples,coverage,fuzzing", "--workers", "1",
             "--request-timeout", "30", "--generation-database", "none", "--no-color",
             *selection],
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            failures.append(f"--- {label}:\n{result.stdout[-6000:]}{result.stderr[-2000:]}")
    assert not failures, "\n".join(failures)
