"""Build a small, randomly initialised causal LM that loads offline.

For smoke tests, CI and air-gapped checks: the output is gibberish, but the model
and tokenizer go through exactly the loading path a Hugging Face hub model does
(`AutoModelForCausalLM.from_pretrained(DIR)`), and everything is deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path

# hidden, layers, heads, intermediate, tokenizer vocabulary
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 128, 1024),
    # The benchmark model: about 35M parameters.
    "small": (512, 8, 8, 1408, 8192),
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format most chat models on the hub use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(seed: int, lines: int = 20000) -> list[str]:
    """Deterministic English-like text: enough distinct words for the BPE merges."""
    rng = random.Random(seed)
    common = (
        "the of and to in is that it for was on are as with his they at be this from "
        "have or by one had not but what all were when we there can an your which their "
        "said if do will each about how up out them then she many some so these would "
        "question answer model token prompt hello world number article summary def return"
    ).split()
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    rare = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(6000)]
    text = []
    for _ in range(lines):
        words = [rng.choice(common) if rng.random() < 0.6 else rng.choice(rare)
                 for _ in range(rng.randint(4, 16))]
        digits = str(rng.randint(0, 9999))
        text.append(" ".join(words).capitalize() + f" {digits}. {rng.choice('?!.,:;')}")
    return text


def _train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def create_test_model(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a Llama-architecture model and its tokenizer to `path`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    hidden, layers, heads, intermediate, vocab = SIZES[size]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab, seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a wider spread makes greedy decoding
    # decisive, so equality tests are not decided by float noise between ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
