"""The compose stack cannot run here (no Docker engine, no compose plugin): check that
it is a valid Compose file and that it hangs together.

`compose-spec.schema.json` is the Compose Specification's JSON schema (compose-spec
project, Apache-2.0), vendored unchanged from the npm package dclint 3.1.0
(`schemas/compose.schema.json`, sha256 46b7d35f19dd93a0...), which ships the
upstream schema (draft-07, with `name`, `include`, `models`, `gpus`). To refresh:
`npm pack dclint` and copy that file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import dockerfile
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
SCHEMA = json.loads((Path(__file__).with_name("compose-spec.schema.json")).read_text())
LONG_RUNNING = {"api", "postgres", "redis", "prometheus", "grafana", "pgadmin"}


def load(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((COMPOSE / name).read_text())


@pytest.fixture(scope="module")
def stack() -> dict:
    return load()


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_validate_against_the_compose_spec(name):
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_catches_what_compose_would_refuse(stack):
    """The validation above can fail: a misspelt key and a bad condition are caught."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    bad = json.loads(json.dumps(stack))
    bad["services"]["api"]["healthchek"] = bad["services"]["api"].pop("healthcheck")
    bad["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert len(list(validator.iter_errors(bad))) == 2


def test_six_services_with_their_ports(stack):
    services = stack["services"]
    assert set(services) == LONG_RUNNING | {"migrate"}
    # "published:container"; the published side may be a ${VAR:-default}.
    ports = {name: [p.rsplit(":", 1)[1] for p in s.get("ports", [])]
             for name, s in services.items()}
    published = {name: [p.rsplit(":", 1)[0] for p in s.get("ports", [])]
                 for name, s in services.items()}
    assert ports["api"] == ["8000"] and published["api"] == ["${LLMCTL_PUBLISHED_PORT:-8000}"]
    assert published["prometheus"] == ["9090"] and published["grafana"] == ["3000"]
    assert published["pgadmin"] == ["5050"] and ports["pgadmin"] == ["80"]
    # Postgres and Redis stay on the stack's network.
    assert not ports["postgres"] and not ports["redis"] and not ports["migrate"]
    api = services["api"]
    assert api["command"][:2] == ["llmctl", "serve"]
    assert api["command"][api["command"].index("--port") + 1] == "8000"
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]
    assert "api:8000" in targets


def test_every_service_has_a_healthcheck_and_a_restart_policy(stack):
    for name in LONG_RUNNING:
        service = stack["services"][name]
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
        assert service["restart"] == "unless-stopped", name
    # The one-shot's readiness is its exit status; it must not be restarted.
    migrate = stack["services"]["migrate"]
    assert migrate["healthcheck"] == {"disable": True} and migrate["restart"] == "no"


def test_dependencies_wait_for_health_and_migrations_run_before_the_api(stack):
    services = stack["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dep, cond in depends.items():
            expected = ("service_completed_successfully" if dep == "migrate"
                        else "service_healthy")
            assert cond["condition"] == expected, (name, dep)
            assert dep == "migrate" or "healthcheck" in services[dep], (name, dep)
    migrate, api = services["migrate"], services["api"]
    assert migrate["command"] == ["llmctl", "db", "upgrade"]
    assert set(api["depends_on"]) == {"migrate", "postgres", "redis"}
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Built once: migrate runs the api's image and builds nothing itself.
    assert "build" not in migrate and migrate["image"] == api["image"]
    assert migrate["pull_policy"] == "never"
    assert migrate["environment"]["LLMCTL_DATABASE_URL"] == api["environment"][
        "LLMCTL_DATABASE_URL"]


def test_data_lives_in_named_volumes_and_config_is_mounted(stack):
    services = stack["services"]
    named = set(stack["volumes"])
    mounts = {name: dict(reversed(v.split(":")[:2]) for v in s.get("volumes", []))
              for name, s in services.items()}
    assert mounts["postgres"]["/var/lib/postgresql/data"] in named
    assert mounts["prometheus"]["/prometheus"] in named
    assert mounts["grafana"]["/var/lib/grafana"] in named
    api = services["api"]
    assert mounts["api"][api["environment"]["LLMCTL_HOME"]] in named
    assert mounts["api"][api["environment"]["HF_HOME"]] in named  # the model cache
    assert mounts["api"]["/app/models.yaml"] == "../models.yaml"
    assert api["command"][api["command"].index("--config") + 1] == "/app/models.yaml"
    # What the observe side provides is mounted where its files expect it.
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert mounts["prometheus"]["/etc/prometheus/prometheus"] == "./prometheus"
    assert mounts["grafana"]["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["grafana"]["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    servers = json.loads((COMPOSE / "pgadmin" / "servers.json").read_text())["Servers"]
    assert [(s["Host"], s["Port"], s["Username"]) for s in servers.values()] == [
        ("postgres", 5432, services["postgres"]["environment"]["POSTGRES_USER"])]
    server_json = services["pgadmin"]["environment"]["PGADMIN_SERVER_JSON_FILE"]
    assert mounts["pgadmin"][server_json] == "./pgadmin/servers.json"


def test_no_credentials_in_the_compose_file_only_in_the_env_file():
    text = (COMPOSE / "docker-compose.yml").read_text()
    stack = yaml.safe_load(text)
    secrets = {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "PGADMIN_PASSWORD"}
    for var in secrets:  # required: compose refuses to start while one is unset
        assert re.search(r"\$\{" + var + r":\?[^}]+\}", text), var
    for service in stack["services"].values():
        for key, value in service.get("environment", {}).items():
            if re.search("PASSWORD", key):
                assert str(value).startswith("${"), key
    assert "postgresql+psycopg://llmctl:${POSTGRES_PASSWORD:?" in text
    example = dict(line.split("=", 1) for line in
                   (COMPOSE / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert secrets <= set(example) and not any(example[s] for s in secrets)
    used = set(re.findall(r"\$\{([A-Z_]+)", text + (COMPOSE / "docker-compose.gpu.yml")
                          .read_text())) - {"GPU_COUNT"}
    assert used <= set(example), used - set(example)


def test_gpu_override_reserves_a_device_and_switches_the_wheel():
    api = load("docker-compose.gpu.yml")["services"]["api"]
    device, = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert "/whl/cu" in api["build"]["args"]["TORCH_INDEX"]
    assert api["environment"]["LLMCTL_MODEL_DEVICE"] == "cuda"


def test_the_image_is_multi_stage_non_root_and_not_editable():
    # BuildKit's own parser (the `dockerfile` package): a syntax error fails here.
    steps = dockerfile.parse_file(str(COMPOSE / "Dockerfile"))
    stages = [i for i, s in enumerate(steps) if s.cmd == "FROM"]
    assert len(stages) >= 2 and all(steps[i].value[1].upper() == "AS" for i in stages)
    final = steps[stages[-1]:]
    users = [s.value[0] for s in final if s.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(s.cmd == "COPY" and "--from=build" in s.flags for s in final)
    installs = [s.value[0] for s in steps if s.cmd == "RUN" and "pip install" in s.value[0]]
    assert installs and all("-c constraints.txt" in run for run in installs)  # exact torch
    assert not any(re.search(r"\s(-e|--editable)\s", run) for run in installs)
    assert 'TORCH_INDEX=https://download.pytorch.org/whl/cpu' in [
        s.value[0] for s in steps if s.cmd == "ARG"]
    assert any('--index-url "${TORCH_INDEX}" torch' in run for run in installs)
    health, = [s for s in final if s.cmd == "HEALTHCHECK"]
    assert health.value[0] == "CMD" and "/readyz" in health.value[-1]
    copies = [s for s in steps if s.cmd == "COPY" and not s.flags]
    assert not any("models.yaml" in s.value for s in copies)  # mounted at run time
    # Everything the build copies is in the context and not excluded by .dockerignore,
    # which leaves out the heavy and the secret.
    ignored = {line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")}
    assert {".git", ".venv", ".env", "compose/.env", "models", "tests"} <= ignored
    for step in copies:
        for source in step.value[:-1]:
            assert (ROOT / source).exists() and source not in ignored, source


def test_every_file_the_stack_mounts_or_builds_from_exists(stack):
    for service in stack["services"].values():
        build = service.get("build")
        if build:
            assert (COMPOSE / build["context"] / build["dockerfile"]).exists()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), source
