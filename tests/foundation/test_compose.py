"""The compose stack cannot run here (no Docker engine); check that it hangs together."""

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose"


def test_compose_stack_is_consistent():
    stack = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = stack["services"]
    assert {"api", "migrate", "postgres", "redis", "prometheus", "grafana", "pgadmin"} <= set(
        services)
    api = services["api"]
    assert api["command"][:2] == ["llmctl", "serve"]
    port = api["command"][api["command"].index("--port") + 1]
    env = api["environment"]
    assert env["LLMCTL_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["LLMCTL_REDIS_URL"].startswith("redis://redis:")
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"api:{port}"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (COMPOSE / build["context"] / build["dockerfile"]).exists()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), source
