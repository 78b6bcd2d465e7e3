"""Prompt token counts are remembered per engine, text and special-token choice."""

import asyncio
import threading

from server.api.tokencounts import TokenCounts


class Counting:
    """Counts one token per word, plus one for a BOS; remembers how often it was asked."""

    def __init__(self):
        self.calls = 0
        self.threads = set()

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int:
        self.calls += 1
        self.threads.add(threading.current_thread())
        return len(text.split()) + int(add_special_tokens)


async def test_counts_are_the_engines_and_asked_once():
    engine, other = Counting(), Counting()
    counts = TokenCounts()
    for _ in range(3):
        assert await counts.count(engine, "a b c", add_special_tokens=True) == 4
        assert await counts.count(engine, "a b c", add_special_tokens=False) == 3
        assert await counts.count(other, "a b c", add_special_tokens=True) == 4
    assert engine.calls == 2 and other.calls == 1


async def test_long_texts_are_always_counted_and_memory_is_bounded():
    engine = Counting()
    counts = TokenCounts(max_chars=10, max_text=8)
    for _ in range(2):
        await counts.count(engine, "x " * 5, add_special_tokens=True)  # 10 chars: too long
    assert engine.calls == 2
    await counts.count(engine, "aaaa", add_special_tokens=True)
    await counts.count(engine, "bbbb", add_special_tokens=True)
    await counts.count(engine, "cccc", add_special_tokens=True)  # past 10 chars held: starts over
    assert engine.calls == 5
    await counts.count(engine, "cccc", add_special_tokens=True)
    await counts.count(engine, "aaaa", add_special_tokens=True)  # forgotten
    assert engine.calls == 6


async def test_long_texts_are_counted_off_the_event_loop():
    engine = Counting()
    counts = TokenCounts(inline_text=8)
    assert await counts.count(engine, "short", add_special_tokens=False) == 1
    assert engine.threads == {threading.current_thread()}
    ticks = 0

    async def tick():
        nonlocal ticks
        ticks += 1

    long = "word " * 10
    assert await asyncio.gather(counts.count(engine, long, add_special_tokens=False),
                                tick()) == [10, None]
    assert len(engine.threads) == 2 and ticks == 1


def test_long_and_short_texts_count_as_the_tokenizer_encodes_them(tiny_model_dir):
    # Long texts take the batch encoder (it releases the GIL); the count must not change.
    from transformers import AutoTokenizer

    from server.engines.tokenizer import SHORT_TEXT, count

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ("Hello, world.", "héllo wörld 漢字 " * (2 * SHORT_TEXT // 15)):
        for special in (True, False):
            expected = tok(text, add_special_tokens=special)["input_ids"]
            assert count(tok, text, add_special_tokens=special) == len(expected)
    assert len(text) > SHORT_TEXT
