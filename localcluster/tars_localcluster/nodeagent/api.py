"""A small async client for the few API calls a node agent makes.

The node agent needs about eight endpoints on raw JSON (strategic-merge status
patches, UID-preconditioned deletes, a watch by field selector); a typed client
(kubernetes_asyncio) would convert every pod to model objects and back for no
gain, so this speaks REST through httpx with the kubeconfig we generate.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml

JSON = dict[str, Any]
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status


class KubeClient:
    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])
        ctx.load_cert_chain(user["client-certificate"], user["client-key"])
        self.base_url: str = cluster["server"]
        self._http = httpx.AsyncClient(base_url=self.base_url, verify=ctx, timeout=httpx.Timeout(10.0))
        self._watch_http = httpx.AsyncClient(
            base_url=self.base_url, verify=ctx, timeout=httpx.Timeout(10.0, read=None)
        )

    async def close(self) -> None:
        await self._http.aclose()
        await self._watch_http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: JSON | None = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> JSON:
        resp = await self._http.request(
            method,
            path,
            params=params,
            content=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type},
        )
        if resp.status_code not in ok:
            raise ApiError(resp.status_code, resp.text, f"{method} {path}")
        return resp.json() if resp.content else {}

    async def get(self, path: str, params: dict[str, str] | None = None) -> JSON:
        return await self.request("GET", path, params=params)

    async def patch(self, path: str, body: JSON, content_type: str = SMP) -> JSON:
        return await self.request("PATCH", path, body=body, content_type=content_type)

    async def watch(self, path: str, params: dict[str, str]) -> AsyncIterator[JSON]:
        """Yield watch events until the server closes the stream."""
        query = dict(params, watch="true", allowWatchBookmarks="true")
        async with self._watch_http.stream("GET", path, params=query) as resp:
            if resp.status_code != 200:
                raise ApiError(
                    resp.status_code, (await resp.aread()).decode(errors="replace"), f"WATCH {path}"
                )
            async for line in resp.aiter_lines():
                if line.strip():
                    yield json.loads(line)
