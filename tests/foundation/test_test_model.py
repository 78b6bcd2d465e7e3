"""`create-test-model` output loads offline with transformers and generates."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_test_model_loads_and_generates(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    ids = tokenizer("Hello there", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0]), str)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_test_model_is_deterministic(tmp_path):
    from server.testmodel import create_test_model

    a = AutoModelForCausalLM.from_pretrained(create_test_model(tmp_path / "a"))
    b = AutoModelForCausalLM.from_pretrained(create_test_model(tmp_path / "b"))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
