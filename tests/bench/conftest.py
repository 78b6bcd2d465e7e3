"""Fixtures for the benchmark tests: the CLI, and a scripted OpenAI-format server.

The scripted server streams real OpenAI completions SSE over loopback with known
timing, so the load generator's parsing and error paths are tested without a
model. The end-to-end tests use the live `llmctl serve` gateway (tests/plugins/live.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import typer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.plugins.ports import free_port

API_KEY = "sk-bench-test"
MODEL = "fake-model"


@pytest.fixture(scope="session")
def cli_app() -> typer.Typer:
    """The root `llmctl` CLI, as users run it."""
    from llmctl.cli import app

    return app


def _fake_app(tokens: int = 6, gap: float = 0.005, usage: bool = True) -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    def envelope(status: int, message: str, type_: str, code: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                       "code": code}}, status_code=status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return envelope(401, "invalid API key", "authentication_error", "invalid_api_key")
        body = await request.json()
        app.state.requests.append(body)
        if body.get("model") != MODEL:
            return envelope(404, f"model {body.get('model')!r} not found", "not_found_error",
                            "model_not_found")
        if "fail" in body["prompt"]:
            return envelope(500, "boom", "server_error", "server_error")
        n = min(tokens, body["max_tokens"])

        async def stream():
            def chunk(payload: dict) -> str:
                return f"data: {json.dumps(payload)}\n\n"

            base = {"id": "cmpl-1", "object": "text_completion", "model": MODEL}
            await asyncio.sleep(gap * 2)  # "prefill"
            for i in range(n):
                if i:
                    await asyncio.sleep(gap)
                yield chunk({**base, "choices": [{"index": 0, "text": f" t{i}",
                                                  "finish_reason": None}]})
            # transformers-serve style: an empty final chunk with finish_reason + usage
            final = {**base, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            if usage:
                final["usage"] = {"prompt_tokens": len(body["prompt"].split()),
                                  "completion_tokens": n,
                                  "total_tokens": n + len(body["prompt"].split())}
            yield ": keep-alive\n\n"
            yield chunk(final)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class _Server:
    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake_server():
    """An OpenAI-format completions server on loopback: 6 tokens, 5 ms apart."""
    with _Server(_fake_app()) as server:
        yield server


@pytest.fixture(scope="module")
def fake_server_no_usage():
    with _Server(_fake_app(usage=False)) as server:
        yield server
