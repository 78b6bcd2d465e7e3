"""lm-eval-style loglikelihood through /v1/completions equals a direct forward pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def direct(model, ids: list[int], context_len: int) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(context_len, len(ids)))


@pytest.mark.parametrize("as_ids", [True, False], ids=["token-ids", "text"])
@pytest.mark.parametrize("max_tokens", [0, 1])
async def test_echo_logprobs_match_forward_pass(gateway, reference, as_ids, max_tokens):
    _app, client, secrets = gateway
    model, tokenizer = reference
    context, continuation = "Question: what is two plus two?\nAnswer:", " four"
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(ctx_ids)] == ctx_ids
    prompt = full_ids if as_ids else context + continuation
    response = await client.post("/v1/completions", headers={"X-API-Key": secrets["user"]},
                                 json={"model": "tiny", "prompt": prompt, "echo": True,
                                       "logprobs": 1, "max_tokens": max_tokens,
                                       "temperature": 0})
    assert response.status_code == 200, response.text
    lp = response.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(full_ids) + max_tokens
    # lm-eval: sum(token_logprobs[ctxlen:-1]) with max_tokens=1, [ctxlen:] with 0
    end = len(full_ids)
    got = sum(lp["token_logprobs"][len(ctx_ids):end])
    assert got == pytest.approx(direct(model, full_ids, len(ctx_ids)), abs=1e-4)
    text = response.json()["choices"][0]["text"]
    assert text.startswith(context + continuation)
