"""A misbehaving OpenAI-compatible backend, as its own process on loopback.

The failures a gateway must survive, on demand, which a healthy llmctl cannot be made
to show: `ok` answers at once, `hang` accepts the request and never answers, `500`
fails every request, `die` streams a few tokens and then the process exits (a crash
mid-stream). GET /stats says how many completion requests arrived and how many
of them the client abandoned (closed the connection) before an answer.

    python -m tests.plugins.fakebackend PORT MODE
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

TOKENS_BEFORE_DYING = 5

stats = {"requests": 0, "abandoned": 0}


def _completion(text: str) -> dict:
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def build_app(mode: str):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request: Request):
        stats["requests"] += 1
        body = await request.json()
        if mode == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if mode == "hang":
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            stats["abandoned"] += 1
            return JSONResponse({}, 499)
        if mode == "die" and body.get("stream"):
            async def events():
                for i in range(TOKENS_BEFORE_DYING):
                    chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)  # let the gateway relay what it got
                os._exit(1)

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(_completion(f" from {os.environ.get('FAKE_NAME', mode)}"))

    async def models(_request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def get_stats(_request):
        return JSONResponse(stats)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models), Route("/stats", get_stats)])


class FakeBackend:
    def __init__(self, mode: str, port: int, log_dir):
        self.mode, self.port = mode, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"fake-{port}.log"
        self.proc = None

    def start(self) -> FakeBackend:
        import subprocess
        import time

        import httpx

        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.plugins.fakebackend", str(self.port), self.mode],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "FAKE_NAME": f"{self.mode}-{self.port}"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/stats", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"fake backend did not start: {self.log_path.read_text()[-2000:]}")

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/stats", timeout=5).json()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def fake_backend_factory(tmp_path):
    """Start fake backends (`mode` as above); all are killed after the test."""
    from tests.plugins.ports import free_port

    started: list[FakeBackend] = []

    def start(mode: str) -> FakeBackend:
        backend = FakeBackend(mode, free_port(), tmp_path).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


if __name__ == "__main__":
    import uvicorn

    port, mode = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(build_app(mode), host="127.0.0.1", port=port, log_level="warning")
