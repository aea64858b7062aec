"""One way to reach the API server for the operator's own calls (kopf logs in by itself)."""

from __future__ import annotations

from kubernetes_asyncio import client, config


async def api_client(kubeconfig: str | None) -> client.ApiClient:
    """From the kubeconfig when given (`make run`), else the pod's service account."""
    if kubeconfig:
        await config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()
