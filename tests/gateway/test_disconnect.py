"""A client that leaves mid-stream stops its generation; the log says so."""

import sqlite3
import time

import httpx


def test_disconnect_mid_stream_stops_generation(live_server):
    key = live_server.create_key("leaver")
    with httpx.stream("POST", live_server.url + "/v1/generate", headers={"X-API-Key": key},
                      json={"prompt": "Tell me everything", "max_new_tokens": 250,
                            "stream": True, "temperature": 0}, timeout=60) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen == 3:
                break
    # connection closed here, long before 250 tokens
    deadline = time.monotonic() + 20
    row = None
    while time.monotonic() < deadline:
        conn = sqlite3.connect(live_server.home / "llmctl.db")
        row = conn.execute("select status, completion_tokens, error_type, finish_reason "
                           "from request_logs where request_id = ?", (request_id,)).fetchone()
        if row:
            break
        time.sleep(0.2)
    assert row is not None, "the disconnected request was not logged"
    status, completion_tokens, error_type, finish_reason = row
    assert error_type == "client_disconnected" and finish_reason == "abort"
    assert 3 <= completion_tokens < 250
