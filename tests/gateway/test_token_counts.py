"""Prompt token counts are remembered per engine, text and special-token choice."""

from server.api.tokencounts import TokenCounts


class Counting:
    """Counts one token per word, plus one for a BOS; remembers how often it was asked."""

    def __init__(self):
        self.calls = 0

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int:
        self.calls += 1
        return len(text.split()) + int(add_special_tokens)


def test_counts_are_the_engines_and_asked_once():
    engine, other = Counting(), Counting()
    counts = TokenCounts()
    for _ in range(3):
        assert counts.count(engine, "a b c", add_special_tokens=True) == 4
        assert counts.count(engine, "a b c", add_special_tokens=False) == 3
        assert counts.count(other, "a b c", add_special_tokens=True) == 4
    assert engine.calls == 2 and other.calls == 1


def test_long_texts_are_always_counted_and_memory_is_bounded():
    engine = Counting()
    counts = TokenCounts(max_chars=10, max_text=8)
    for _ in range(2):
        counts.count(engine, "x " * 5, add_special_tokens=True)  # 10 chars: too long
    assert engine.calls == 2
    counts.count(engine, "aaaa", add_special_tokens=True)
    counts.count(engine, "bbbb", add_special_tokens=True)
    counts.count(engine, "cccc", add_special_tokens=True)  # past 10 chars held: starts over
    assert engine.calls == 5
    counts.count(engine, "cccc", add_special_tokens=True)
    counts.count(engine, "aaaa", add_special_tokens=True)  # forgotten
    assert engine.calls == 6
