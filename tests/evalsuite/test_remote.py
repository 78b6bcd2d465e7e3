"""The OpenAI-compatible eval model against mock servers (httpx.MockTransport)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from evalsuite import runner
from evalsuite.models import LoglikelihoodUnsupported
from evalsuite.remote_model import OpenAIModel
from evalsuite.tasks import Request, TaskOptions, get_task
from server.errors import AuthenticationError, QuotaExceeded


def tokens_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


def fake_logprob(token: str) -> float:
    return -len(token) / 10


class FakeServer:
    """A tiny OpenAI-style server: whitespace tokens, logprob = -len(token)/10, and the
    token `zz` is never the argmax."""

    def __init__(self, *, logprobs=True, completions=True, fail_first: int = 0,
                 status: int = 429, code: str | None = None):
        self.logprobs, self.completions = logprobs, completions
        self.fail_first, self.status, self.code = fail_first, status, code
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append((request.url.path, body))
        if self.fail_first:
            self.fail_first -= 1
            return httpx.Response(self.status, json={"error": {
                "message": "slow down", "type": "rate_limit_error", "code": self.code}},
                headers={"retry-after": "0"})
        if request.headers.get("authorization") != "Bearer k":
            return httpx.Response(401, json={"error": {"message": "invalid api key",
                                                       "type": "authentication_error"}})
        if request.url.path == "/v1/completions":
            if not self.completions:
                return httpx.Response(404, json={"detail": "Not Found"})
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = []
            for i, p in enumerate(prompts):
                if body.get("echo"):
                    toks = tokens_of(p)
                    lp = {"tokens": toks,
                          "token_logprobs": [None] + [fake_logprob(t) for t in toks[1:]],
                          "top_logprobs": [None] + [
                              {("yy" if t.strip() == "zz" else t): fake_logprob(t)}
                              for t in toks[1:]],
                          "text_offset": []} if self.logprobs else None
                    choices.append({"index": i, "text": p, "logprobs": lp})
                else:
                    choices.append({"index": i, "text": " 42 #### 42\n\nQuestion: more STOP5 x"})
            return httpx.Response(200, json={"choices": choices})
        if request.url.path == "/v1/chat/completions":
            return httpx.Response(200, json={"choices": [
                {"index": 0, "message": {"role": "assistant", "content": "B\nbecause"}}]})
        return httpx.Response(404, json={})


def model_for(server: FakeServer, key: str = "k") -> OpenAIModel:
    return OpenAIModel("http://fake", "m", api_key=key, concurrency=3,
                       transport=httpx.MockTransport(server))


def test_loglikelihood_from_echoed_prompt_logprobs():
    server = FakeServer()
    model = model_for(server)
    reqs = [Request("Question: one two\nAnswer:", " A"), Request("Question: one two\nAnswer:",
                                                                " zz B"),
            Request("ctx with trailing space ", "word")]
    results = dict(x for batch in model.loglikelihood(reqs) for x in batch)
    assert results[0] == (pytest.approx(fake_logprob(" A")), True)
    assert results[1] == (pytest.approx(fake_logprob(" zz") + fake_logprob(" B")), False)
    # The context's trailing space moves to the continuation, as lm-eval does.
    assert results[2] == (pytest.approx(fake_logprob(" word")), True)
    # One request per distinct context, holding the context and every continuation.
    echo_calls = [b for path, b in server.calls if b.get("echo")]
    assert len(echo_calls) == 2
    assert all(b["max_tokens"] == 0 and b["logprobs"] == 1 for b in echo_calls)


def test_a_server_without_prompt_logprobs_gets_a_clear_error():
    model = model_for(FakeServer(logprobs=False))
    with pytest.raises(LoglikelihoodUnsupported, match="cannot return prompt logprobs"):
        runner.choose_mmlu_variant(get_task("mmlu", TaskOptions()), model)


def test_chat_only_model_gets_generative_mmlu_with_a_note():
    server = FakeServer(completions=False)
    model = model_for(server)
    task = get_task("mmlu", TaskOptions())
    notes = runner.choose_mmlu_variant(task, model)
    assert task.generative and task.metrics == ("exact_match",)
    assert "only offers chat" in notes[0] and "generative" in notes[0]
    outputs = dict(x for b in model.generate([Request("Q?\nAnswer:", until=("</s>", "\n"))])
                   for x in b)
    assert outputs[0] == "B"
    assert server.calls[-1][0] == "/v1/chat/completions"
    assert server.calls[-1][1]["messages"] == [{"role": "user", "content": "Q?\nAnswer:"}]


def test_generation_cuts_every_stop_string_even_past_four():
    server = FakeServer()
    stops = ("Question:", "</s>", "<|im_end|>", "STOP4", "STOP5")
    out = dict(x for b in model_for(server).generate([Request("Q", until=stops)]) for x in b)
    assert out[0] == " 42 #### 42\n\n"
    assert server.calls[-1][1]["stop"] == list(stops[:4])
    assert server.calls[-1][1]["temperature"] == 0


def test_errors_map_to_the_project_hierarchy():
    with pytest.raises(AuthenticationError, match="invalid api key"):
        list(model_for(FakeServer(), key="wrong").generate([Request("Q")]))
    with pytest.raises(QuotaExceeded):
        list(model_for(FakeServer(fail_first=1, code="insufficient_quota")).generate(
            [Request("Q")]))
    # Rate limits and server errors are retried.
    server = FakeServer(fail_first=2, status=503)
    assert list(model_for(server).generate([Request("Q")]))
    assert len(server.calls) == 3
