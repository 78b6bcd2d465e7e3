"""Prompt token counts, remembered for the texts seen recently, long ones counted
off the event loop.

Every request counts its prompt before anything else (the context check, the
usage it reports), a cache hit included; for a short prompt the tokenizer's encode
was the largest single cost of a hit. A count is a pure function of the engine's
tokenizer and the text, so a repeated prompt (what a cache hit is) need not be
encoded again. Held: at most `max_chars` characters of text (services/memo.py);
texts longer than `max_text` are always counted afresh.

Encoding takes about a second per megabyte here: a text longer than `inline_text`
is counted in a worker thread, with an encoder that releases the GIL
(engines/tokenizer.py), so one long prompt never stalls every other request.
"""

from __future__ import annotations

import asyncio

from server.engines.base import ModelEngine
from server.services.memo import MISSING, Memo


class TokenCounts:
    def __init__(self, *, max_chars: int = 2_000_000, max_text: int = 32_768,
                 inline_text: int = 4096):
        self.max_text = max_text
        self.inline_text = inline_text
        # (engine, add_special_tokens, text) -> count. Engines live as long as the app
        # (the manager never replaces one), so holding them here changes nothing.
        self._counts = Memo(max_size=max_chars)

    async def count(self, engine: ModelEngine, text: str, *,
                    add_special_tokens: bool) -> int | None:
        key = (engine, add_special_tokens, text) if len(text) <= self.max_text else None
        if key is not None:
            count = self._counts.get(key)
            if count is not MISSING:
                return count
        if len(text) <= self.inline_text:
            count = engine.count_tokens(text, add_special_tokens=add_special_tokens)
        else:
            count = await asyncio.to_thread(engine.count_tokens, text,
                                            add_special_tokens=add_special_tokens)
        if key is not None:
            self._counts.put(key, count, len(text))
        return count
