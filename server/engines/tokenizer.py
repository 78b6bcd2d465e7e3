"""A model's tokenizer, for the gateway's own counting: loading it, counting with it,
and how long its longest token is. Shared by local engines and by remote models that
name their tokenizer in models.yaml.

Fast tokenizers must not encode from two threads at once ("Already borrowed"):
`Counter` holds a lock around each use.
"""

from __future__ import annotations

import threading

from server.errors import ConfigError


def load_tokenizer(source: str, revision: str | None, model_name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of model {model_name!r} from "
                          f"{source!r}: {exc}") from None


def longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry (byte-level BPE writes one character
    per byte, so this also bounds the bytes a token covers)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


SHORT_TEXT = 4096  # characters; see count()


def count(tokenizer, text: str, *, add_special_tokens: bool) -> int:
    """Tokens of `text`; call with the tokenizer's lock held."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if len(text) <= SHORT_TEXT:
        # The single encode: encode_batch's thread-pool hop costs ~1 ms of wall time
        # on a busy 2-core machine, more than a short text takes to encode.
        return len(backend.encode(text, add_special_tokens=add_special_tokens).ids)
    # A long text is counted in a worker thread, and the single encode holds the GIL
    # throughout (a 1 MB prompt froze the gateway's event loop for ~0.5 s). The batch
    # encoders release it; the `_fast` one also skips the offsets a count never reads.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return len(encode([text], add_special_tokens=add_special_tokens)[0].ids)


class Counter:
    """A remote model's tokenizer, loaded on first use (`load` off the event loop)."""

    def __init__(self, source: str, model_name: str):
        self.source = source
        self.model_name = model_name
        self.tokenizer = None
        self.longest: int | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self.tokenizer is None:
                tok = load_tokenizer(self.source, None, self.model_name)
                self.longest = longest_token(tok)
                self.tokenizer = tok

    def count(self, text: str, *, add_special_tokens: bool) -> int:
        self.load()
        with self._lock:
            return count(self.tokenizer, text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict]) -> str | None:
        """The chat template's text, when the tokenizer has a template."""
        self.load()
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        with self._lock:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception:  # the remote renders it; the byte bound applies instead
                return None
