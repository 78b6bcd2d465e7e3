"""Reading a running gateway's admin API, for commands that show its live state
(what only the serving process knows: backend health, in-flight requests)."""

from __future__ import annotations

import httpx

from server.errors import AuthenticationError, PermissionDenied, Unavailable, UpstreamError


def admin_get(url: str, api_key: str | None, path: str, timeout: float = 10.0) -> dict:
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base + path, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach the gateway at {base}: {exc.__class__.__name__}") \
            from None
    if response.status_code == 401:
        raise AuthenticationError("the gateway refused the key: pass an admin key with "
                                  "--api-key or LLMCTL_API_KEY")
    if response.status_code == 403:
        raise PermissionDenied("this key is not an admin key")
    if response.status_code != 200:
        raise UpstreamError(f"the gateway at {base} answered HTTP {response.status_code}")
    return response.json()
