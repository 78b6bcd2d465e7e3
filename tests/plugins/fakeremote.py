"""An OpenAI-compatible server that lies about usage, on loopback (a real HTTP peer).

It answers /v1/completions and /v1/chat/completions with a fixed text and reports
`prompt_tokens` and `completion_tokens` as the test sets them (`usage`), for
example far more than the request could cost, or negative numbers.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.plugins.ports import free_port


class FakeRemote:
    def __init__(self):
        self.usage = {"prompt_tokens": 1, "completion_tokens": 1}
        self.delay = 0.0
        self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))

    async def _answer(self, request: Request, choice: dict, obj: str) -> JSONResponse:
        import asyncio

        self.requests += 1
        await request.json()
        if self.delay:
            await asyncio.sleep(self.delay)
        return JSONResponse({"id": "x", "object": obj, "created": 0, "model": "fake",
                             "choices": [{"index": 0, "finish_reason": "length", **choice}],
                             "usage": dict(self.usage)})

    async def _completions(self, request: Request):
        return await self._answer(request, {"text": " lies", "logprobs": None},
                                  "text_completion")

    async def _chat(self, request: Request):
        return await self._answer(request, {"message": {"role": "assistant",
                                                        "content": " lies"}},
                                  "chat.completion")

    async def _models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def start(self) -> FakeRemote:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/v1/models", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the fake remote did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def fake_remote():
    remote = FakeRemote().start()
    yield remote
    remote.stop()
