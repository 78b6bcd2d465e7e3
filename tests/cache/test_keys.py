"""Cache keys: what is cacheable, and which changes make a different entry."""

import pytest

from server.errors import InvalidRequest
from server.services.cache import CompletionCache, parse_controls, prompt_hash
from server.services.memo import MISSING, Memo
from tests.cache.conftest import make_settings

BASE = dict(max_tokens=16, stop=["\n"], temperature=0, top_p=1.0, top_k=0, seed=None,
            logprobs=None, echo=False, n=1, api="completions")


def key(cache, prompt="Hello", model="tiny", revision=None, key_id=None, **params):
    return cache.key_for(model=model, revision=revision, prompt=prompt,
                         params={**BASE, **params}, key_id=key_id)


@pytest.fixture
def cache():
    return CompletionCache(make_settings(), db=None)


def test_greedy_and_seeded_are_cacheable_sampling_without_seed_is_not(cache):
    assert key(cache) is not None
    assert key(cache, temperature=0.7, seed=3) is not None
    assert key(cache, temperature=0.7) is None
    assert key(cache, temperature=None) is None  # the OpenAI default samples


def test_same_request_same_key_numbers_and_nulls_normalised(cache):
    a = key(cache)
    assert a.key == key(cache).key
    assert a.key == key(cache, temperature=0.0, top_p=1).key
    assert a.key == key(cache, stop="\n").key  # a single stop string is a list of one
    assert a.key == key(cache, extra=None).key  # a null parameter is an absent one
    assert len(a.key) == 64 and a.scope == "global" and a.model == "tiny"


@pytest.mark.parametrize("change", [
    {"max_tokens": 17}, {"stop": ["."]}, {"temperature": 0.5, "seed": 1}, {"top_p": 0.9},
    {"top_k": 5}, {"seed": 1}, {"logprobs": 2}, {"echo": True}, {"n": 2}, {"api": "chat"},
])
def test_every_output_parameter_changes_the_key(cache, change):
    assert key(cache, **change).key != key(cache).key
    assert key(cache, **change).prompt_hash == key(cache).prompt_hash


def test_prompt_model_and_revision_change_the_key(cache):
    base = key(cache).key
    assert key(cache, prompt="Hello ").key != base
    assert key(cache, model="other").key != base
    assert key(cache, revision="abc").key != base


def test_prompt_forms_never_collide():
    assert prompt_hash("[1, 2]") != prompt_hash([1, 2])
    assert prompt_hash([1, 2]) == prompt_hash((1, 2))
    msgs = [{"role": "user", "content": "hi"}]
    assert prompt_hash(msgs) != prompt_hash("hi")
    assert prompt_hash(msgs) == prompt_hash([{"content": "hi", "role": "user"}])


def test_scope_key_isolates_tenants():
    glob = CompletionCache(make_settings(), db=None)
    assert key(glob, key_id=1).key == key(glob, key_id=2).key
    per_key = CompletionCache(make_settings(cache_scope="key"), db=None)
    a, b = key(per_key, key_id=1), key(per_key, key_id=2)
    assert a.key != b.key and a.scope == "key:1" and b.scope == "key:2"
    assert a.key != key(glob, key_id=1).key


def test_disabled_cache_caches_nothing():
    assert key(CompletionCache(make_settings(cache_enabled=False), db=None)) is None


@pytest.mark.parametrize("header, field, lookup, store", [
    (None, None, True, True),
    ("no-cache", None, False, True),
    ("no-store", None, True, False),
    ("No-Cache, no-store", None, False, False),
    ("max-age=0", None, True, True),
    (None, True, True, True),
    (None, False, False, False),
    (None, "no-store", True, False),
    (None, "no-cache", False, True),
    ("no-store", "no-cache", False, False),
])
def test_controls(header, field, lookup, store):
    ctl = parse_controls(header, field)
    assert (ctl.lookup, ctl.store) == (lookup, store)


def test_bad_cache_field_is_a_400():
    with pytest.raises(InvalidRequest):
        parse_controls(None, 3)


def test_model_id_goes_into_the_key_and_the_name_is_stored(cache):
    a = cache.key_for(model="tiny", model_id="org/tiny-35m", prompt="x", params={"temperature": 0})
    b = cache.key_for(model="alias", model_id="org/tiny-35m", prompt="x", params={"temperature": 0})
    assert a.key == b.key and (a.model, b.model) == ("tiny", "alias")
    assert a.key != key(cache, prompt="x").key


def test_a_batch_of_prompts_is_one_key():
    assert prompt_hash(["a", "b"]) != prompt_hash(["b", "a"]) != prompt_hash("ab")


@pytest.mark.parametrize("scope", ["global", "key"])
def test_remembered_keys_are_the_derived_ones(scope):
    """key_for remembers its digests for inputs it can compare exactly: a remembered
    key equals a fresh derivation, and values Python calls equal but the digests do
    not (1, 1.0, True) never share one."""
    warm = CompletionCache(make_settings(cache_scope=scope), db=None)
    cases = [{}, {"top_k": 1}, {"top_k": 1.0}, {"top_k": True}, {"stop": ("a",)},
             {"stop": ()}, {"seed": 1, "temperature": 0.5}, {"seed": True, "temperature": 0.5},
             {"prompt": ["Hello"]}, {"prompt": ("Hello",)}, {"prompt": [1, 2]},
             {"key_id": 1}, {"key_id": 2}, {"model": "other"}, {"revision": "r1"}]
    for _ in range(2):  # the second round is answered from memory where it can be
        for kw in cases:
            settings = make_settings(cache_scope=scope)
            want = key(CompletionCache(settings, db=None), **kw)
            assert key(warm, **kw) == want, kw
    assert len(warm._keys) > 0
    assert key(warm, top_k=True).key != key(warm, top_k=1).key
    assert key(warm, top_k=1.0).key == key(warm, top_k=1).key


def test_memo_is_bounded():
    memo = Memo(max_entries=3, max_size=10)
    memo.put("a", 1, 4)
    memo.put("b", 2, 4)
    assert memo.get("a") == 1 and memo.get("b") == 2
    memo.put("c", 3, 4)  # past the size budget: it starts over
    assert memo.get("a") is MISSING and memo.get("c") == 3 and len(memo) == 1
    memo.put("d", 4)
    memo.put("e", 5)
    memo.put("f", 6)  # past the entry budget
    assert len(memo) == 1 and memo.get("f") == 6
    memo.put("huge", 0, 11)  # larger than the whole budget: never kept
    assert memo.get("huge") is MISSING
