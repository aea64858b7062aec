"""One way to reach the API server for the operator's own calls (kopf logs in by itself)."""

from __future__ import annotations

from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

# A merge patch: for a dict body the client would pick JSON Patch. Its stubs do not declare the kwarg.
MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}
# What an API call can fail with: a refusal, a timeout, or the connection breaking (an API
# server restart surfaces as aiohttp errors that are not OSErrors).
API_ERRORS = (ApiException, TimeoutError, OSError, aiohttp.ClientError)


async def api_client(kubeconfig: str | None) -> client.ApiClient:
    """From the kubeconfig when given (`make run`), else the pod's service account."""
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
