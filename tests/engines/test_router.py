"""RouterEngine on in-process engines: routing, ejection, probes; and the models.yaml
schema for replicas and fallbacks."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from server.config import ModelsConfig, Settings
from server.engines.base import Completion, EngineRequest, ModelEngine, SamplingParams
from server.engines.manager import MultiModelManager
from server.engines.remote import HttpLLMClient
from server.errors import ConfigError, UpstreamError


class Scripted(ModelEngine):
    """Answers after `delay` seconds, or fails while `failing`; counts its calls."""

    def __init__(self, spec):
        self.spec, self.model_id = spec, spec.id
        self.delay, self.failing, self.probe_ok, self.calls = 0.0, False, False, 0

    async def start(self):
        return None

    async def generate(self, request):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.failing:
            raise UpstreamError("boom")
        return Completion(text="x", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    async def stream(self, request):
        yield await self.generate(request)

    async def health(self):
        return self.probe_ok, "probe"

    async def close(self):
        return None


def manager(models: list[dict], **settings) -> MultiModelManager:
    config = ModelsConfig.model_validate({"models": models})
    return MultiModelManager(config, Settings(**settings), lambda spec, _s: Scripted(spec))


def replicas(*names, weights=None, routing=None, **extra) -> dict:
    weights = weights or [1] * len(names)
    return {"id": "m", "type": "remote", "routing": routing or {}, **extra,
            "backends": [{"name": n, "base_url": f"http://{n}:8000", "weight": w}
                         for n, w in zip(names, weights, strict=True)]}


def request() -> EngineRequest:
    return EngineRequest(params=SamplingParams(max_new_tokens=1), prompt="hi")


async def test_least_outstanding_sends_less_to_a_slow_replica():
    mgr = manager([replicas("slow", "fast")])
    router = await mgr.get(mgr.spec("m"))
    engines = {b.name: b.engine for b in router.backends}
    engines["slow"].delay, engines["fast"].delay = 0.2, 0.01

    async def client():
        for _ in range(10):
            await router.generate(request())

    await asyncio.gather(*(client() for _ in range(6)))
    assert engines["fast"].calls > 3 * engines["slow"].calls
    await mgr.close()


async def test_ties_go_by_weight():
    mgr = manager([replicas("heavy", "light", weights=[4, 1])])
    router = await mgr.get(mgr.spec("m"))
    served = Counter()
    for _ in range(300):
        r = request()
        await router.generate(r)
        served[r.served_by] += 1
    assert served["m/heavy"] > 2 * served["m/light"] > 0
    await mgr.close()


async def test_failures_eject_for_a_growing_cooldown_and_a_probe_restores():
    mgr = manager([replicas("bad", "good", routing={"eject_after": 2, "cooldown": 0.2,
                                                     "probe_interval": 0.05})])
    router = await mgr.get(mgr.spec("m"))
    bad = next(b for b in router.backends if b.name == "bad")
    bad.engine.failing = True
    for _ in range(20):
        r = request()
        await router.generate(r)  # retried on "good": never fails the caller
        assert r.served_by == "m/good"
    assert bad.ejected and bad.engine.calls == 2  # ejected after two failures
    await asyncio.sleep(0.25)  # the cooldown is over: one trial, which fails again
    for _ in range(5):
        await router.generate(request())
    assert bad.engine.calls == 3 and bad.ejections == 2
    assert bad.cooldown == pytest.approx(0.8)  # 0.2, then 0.4, the next 0.8
    bad.engine.failing, bad.engine.probe_ok = False, True
    await asyncio.sleep(0.2)  # the probe finds it answering
    assert not bad.ejected
    assert (await router.health()) == (True, "ready")
    await mgr.close()


async def test_single_backend_models_are_built_as_before():
    config = ModelsConfig.model_validate({"models": [
        {"id": "plain", "type": "remote", "base_url": "http://x:1/v1"},
        {"id": "local", "path": "/models/tiny"}]})
    mgr = MultiModelManager(config, Settings())
    assert isinstance(mgr._build(mgr.spec("plain")), HttpLLMClient)
    assert not any(mgr.routed(s) for s in config.models)


def test_backends_inherit_the_model_and_override_it():
    config = ModelsConfig.model_validate({"models": [{
        "id": "org/m", "name": "m", "type": "remote", "api": "llmctl", "timeout": 9,
        "first_byte_timeout": 4, "fallbacks": ["n"],
        "backends": [{"base_url": "http://a:8000/v1"},
                     {"base_url": "http://b:8000/v1", "first_byte_timeout": 1, "weight": 2},
                     {"type": "local", "path": "/models/m"}]},
        {"id": "n", "type": "remote", "base_url": "http://n:1"}]})
    m = config.find("m")
    (a, wa, sa), (b, wb, sb), (c, _, sc) = m.replicas()
    assert (a, b, c) == ("a:8000", "b:8000", "local") and (wa, wb) == (1.0, 2.0)
    assert (sa.api, sa.timeout, sa.first_byte_timeout) == ("llmctl", 9, 4)
    assert sb.first_byte_timeout == 1 and sc.type == "local" and sc.source == "/models/m"
    assert not sa.backends and not sa.fallbacks
    assert config.fallback_targets == {"n"}


@pytest.mark.parametrize("models, message", [
    ([{"id": "m", "type": "remote", "backends": [{"base_url": "http://a:1"},
                                                  {"base_url": "http://a:1"}]}],
     "backend name 'a:1' is used twice"),
    ([{"id": "m", "type": "remote", "backends": [{"name": "x"}]}],
     "backends[0]: a remote backend needs base_url"),
    ([{"id": "m", "base_url": "http://a:1", "type": "remote", "fallbacks": ["nope"]}],
     "fallback 'nope' is not another configured model"),
    ([{"id": "a", "path": "/x", "fallbacks": ["b"]}, {"id": "b", "path": "/x",
                                                       "fallbacks": ["a"]}],
     "its fallbacks lead back to it"),
])
def test_bad_replica_configs_say_what_is_wrong(tmp_path, models, message):
    import yaml

    from server.config import load_models_config

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    with pytest.raises(ConfigError) as err:
        load_models_config(Settings(), path)
    assert message in err.value.message and "\n" not in err.value.message
