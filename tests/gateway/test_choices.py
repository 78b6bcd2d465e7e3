"""n choices and batched prompts: one choice per (prompt, n), usage counted once per prompt."""

import json


async def test_n_choices_and_prompt_batches(gateway):
    _app, client, secrets = gateway
    headers = {"X-API-Key": secrets["user"]}
    body = {"model": "tiny", "prompt": ["first prompt", "second one here"], "n": 2,
            "max_tokens": 5, "temperature": 0.8, "seed": 7}
    plain = (await client.post("/v1/completions", headers=headers, json=body)).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2, 3]
    # the same seed for both choices of a prompt gives the same text
    texts = [c["text"] for c in plain["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]

    response = await client.post("/v1/completions", headers={**headers, "Cache-Control":
                                                             "no-cache"},
                                 json={**body, "stream": True,
                                       "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = {i: "" for i in range(4)}
    for event in events:
        for choice in event["choices"]:
            streamed[choice["index"]] += choice["text"]
    assert [streamed[i] for i in range(4)] == texts
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
