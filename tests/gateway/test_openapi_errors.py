"""/openapi.json documents the errors the API answers, with the envelope's schema
(schemathesis checks the answers against it: test_fuzz.py)."""

from __future__ import annotations

from server.api.app import create_app
from server.config import ModelsConfig, Settings


def test_operations_document_their_error_responses(tmp_path):
    doc = create_app(Settings(_env_file=None, home=tmp_path), ModelsConfig()).openapi()
    envelope = doc["components"]["schemas"]["ErrorResponse"]
    assert envelope["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    ops = {(method.upper(), path): op["responses"] for path, item in doc["paths"].items()
           for method, op in item.items()}
    assert all("422" not in responses for responses in ops.values())
    expect = {
        ("POST", "/v1/completions"): {"400", "401", "403", "404", "413", "429", "502", "503"},
        ("POST", "/v1/admin/keys"): {"400", "401", "403", "404", "409", "413", "429", "503"},
        ("GET", "/v1/admin/logs/{request_id}"): {"400", "401", "403", "404", "429", "503"},
        ("GET", "/v1/me/usage"): {"400", "401", "429", "503"},
    }
    for op, statuses in expect.items():
        errors = {s for s in ops[op] if s >= "400"}
        assert errors == statuses, op
        for status in statuses:
            schema = ops[op][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(ops[("GET", "/healthz")]) == {"200"}
    assert set(ops[("GET", "/readyz")]) == {"200", "503"}
    assert "text/plain" in ops[("GET", "/metrics")]["200"]["content"]
    assert "text/event-stream" in ops[("POST", "/v1/chat/completions")]["200"]["content"]
