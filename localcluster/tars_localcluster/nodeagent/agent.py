"""The node agent: registers a Node, keeps its Lease and Ready condition
fresh, and runs the pods the scheduler binds to it (see pod.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import platform
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from tars_agent import contract
from tars_localcluster import cgroups, network
from tars_localcluster.config import ClusterConfig
from tars_localcluster.nodeagent.api import ApiError, KubeClient
from tars_localcluster.nodeagent.pod import PodRunner, termination_grace, utcnow
from tars_localcluster.nodeagent.status import rfc3339

JSON = dict[str, Any]
log = logging.getLogger("nodeagent")

LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 20


def rfc3339_micro(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def scrape_target(pod: JSON, pod_ip: str) -> JSON | None:
    """A file_sd target group for a pod annotated prometheus.io/scrape=true,
    labelled as Kubernetes service discovery plus the usual relabelling would."""
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or "prometheus.io/port" not in annotations:
        return None
    labels = {
        "namespace": pod["metadata"]["namespace"],
        "pod": pod["metadata"]["name"],
        "__metrics_path__": annotations.get("prometheus.io/path", "/metrics"),
    }
    for key, value in pod["metadata"].get("labels", {}).items():
        labels[re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    if contract.POOL_LABEL in pod["metadata"].get("labels", {}):
        # As the chart's PodMonitor does: every agent series carries its pool.
        labels["pool"] = pod["metadata"]["labels"][contract.POOL_LABEL]
    return {"targets": [f"{pod_ip}:{annotations['prometheus.io/port']}"], "labels": labels}


class Ipam:
    """Pod addresses from the pod CIDR. Freed addresses go to the back of the
    line, so a new pod does not inherit a just-deleted pod's address."""

    def __init__(self, cidr: str, reserved: set[str]) -> None:
        self.free = [str(ip) for ip in ipaddress.ip_network(cidr).hosts() if str(ip) not in reserved]
        self.by_uid: dict[str, str] = {}

    def allocate(self, uid: str) -> str:
        if uid in self.by_uid:
            return self.by_uid[uid]
        if not self.free:
            raise RuntimeError("the pod CIDR has no free address left")
        ip = self.free.pop(0)
        self.by_uid[uid] = ip
        return ip

    def release(self, uid: str) -> None:
        ip = self.by_uid.pop(uid, None)
        if ip is not None:
            self.free.append(ip)


class NodeAgent:
    def __init__(
        self,
        cfg: ClusterConfig,
        kubeconfig: Path,
        state_dir: Path,
        health_port: int,
        image_commands: dict[str, list[str]],
        backoff_base: float,
        backoff_max: float,
        kubernetes_version: str,
        scrape_targets_file: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_name = cfg.node_name
        self.api = KubeClient(kubeconfig)
        self.state_dir = state_dir
        self.health_port = health_port
        self.image_commands = image_commands
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.kubernetes_version = kubernetes_version
        self.scrape_targets_file = scrape_targets_file
        self.host_ip = cfg.gateway_ip
        self.cgroup_root = cfg.cgroup_root
        self.ipam = Ipam(cfg.pod_cidr, {cfg.gateway_ip})
        self.pods: dict[str, PodRunner] = {}
        self.probe_http = httpx.AsyncClient(verify=False)  # probes, like the kubelet's, skip TLS checks
        self.last_sync = utcnow()
        # Pods see the API server as in-cluster clients do (no kube-proxy here:
        # the address is the API server's real one, not a Service IP).
        api = httpx.URL(self.api.base_url)
        self.base_env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "KUBERNETES_SERVICE_HOST": str(api.host),
            "KUBERNETES_SERVICE_PORT": str(api.port),
        }

    # ---- node -------------------------------------------------------------
    def _capacity(self) -> JSON:
        mem_kib = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        return {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{mem_kib}Ki",
            "pods": "110",
            "ephemeral-storage": "50Gi",
        }

    def _node_status(self) -> JSON:
        now = rfc3339(utcnow())
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHas{reason}",
                "message": message,
                "lastHeartbeatTime": now,
            }
            for kind, reason, message in (
                ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"),
            )
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "tars node agent is posting ready status",
                "lastHeartbeatTime": now,
            }
        )
        capacity = self._capacity()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex,
                "systemUUID": uuid.uuid5(uuid.NAMESPACE_URL, self.node_name).hex,
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": "tars local node agent (processes, no containers)",
                "containerRuntimeVersion": "tars-local://0.1",
                "kubeletVersion": self.kubernetes_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64" if platform.machine() == "x86_64" else platform.machine(),
            },
        }

    async def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "tars.dev/local-node": "true",
                },
            },
        }
        try:
            await self.api.request("POST", "/api/v1/nodes", body=body)
            log.info("registered node %s", self.node_name)
        except ApiError as exc:
            if exc.status != 409:
                raise
        await self.post_node_status()

    async def post_node_status(self) -> None:
        await self.api.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})

    async def _lease_loop(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        last_status = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                now = rfc3339_micro(utcnow())
                spec = {
                    "holderIdentity": self.node_name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": now,
                }
                try:
                    lease = await self.api.get(path)
                    lease["spec"].update(spec)
                    await self.api.request("PUT", path, body=lease)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    node = await self.api.get(f"/api/v1/nodes/{self.node_name}")
                    await self.api.request(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        body={
                            "apiVersion": "coordination.k8s.io/v1",
                            "kind": "Lease",
                            "metadata": {
                                "name": self.node_name,
                                "namespace": "kube-node-lease",
                                "ownerReferences": [
                                    {
                                        "apiVersion": "v1",
                                        "kind": "Node",
                                        "name": self.node_name,
                                        "uid": node["metadata"]["uid"],
                                    }
                                ],
                            },
                            "spec": spec,
                        },
                    )
                if loop.time() - last_status >= NODE_STATUS_SECONDS:
                    await self.post_node_status()
                    last_status = loop.time()
            except (ApiError, httpx.HTTPError) as exc:
                log.warning("lease/node status renewal failed (will retry): %s", exc)
            await asyncio.sleep(LEASE_RENEW_SECONDS)

    # ---- pods -------------------------------------------------------------
    def event(self, pod: JSON, reason: str, message: str, kind: str = "Normal") -> None:
        asyncio.get_running_loop().create_task(self._post_event(pod, reason, message, kind))

    async def _post_event(self, pod: JSON, reason: str, message: str, kind: str) -> None:
        meta = pod["metadata"]
        now = rfc3339_micro(utcnow())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "kind": "Pod",
                "apiVersion": "v1",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "tars-node-agent", "host": self.node_name},
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
            "reportingComponent": "tars-node-agent",
            "reportingInstance": self.node_name,
        }
        try:
            await self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body=body)
        except (ApiError, httpx.HTTPError) as exc:
            log.debug("event %s for %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], exc)

    def _on_pod(self, kind: str, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        runner = self.pods.get(uid)
        if kind == "DELETED":
            if runner is not None:
                runner.gone = True
                self._stop(runner, grace=0, delete_object=False)
            return
        if runner is None:
            runner = PodRunner(self, pod)
            self.pods[uid] = runner
            if pod["metadata"].get("deletionTimestamp"):
                # Deleted before this agent ran it: nothing to stop, just release it.
                self._stop(runner, grace=0, delete_object=True)
                return
            log.info("pod %s/%s bound here: starting", pod["metadata"]["namespace"], pod["metadata"]["name"])
            runner.start()
            return
        runner.update(pod)
        if pod["metadata"].get("deletionTimestamp") and not runner.stopping.is_set():
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            self._stop(
                runner, grace=termination_grace(pod) if grace is None else float(grace), delete_object=True
            )

    def _stop(self, runner: PodRunner, grace: float, delete_object: bool) -> None:
        runner.stopping.set()

        async def stop() -> None:
            try:
                await runner.stop(grace, delete_object)
            finally:
                self.pods.pop(runner.uid, None)
                self.refresh_scrape_targets()

        asyncio.get_running_loop().create_task(stop(), name=f"stop {runner.key}")

    async def _watch_pods(self) -> None:
        params = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        while True:
            try:
                listing = await self.api.get("/api/v1/pods", params=params)
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._on_pod("ADDED", pod)
                for uid, runner in list(self.pods.items()):
                    if uid not in seen and not runner.stopping.is_set():
                        runner.gone = True
                        self._stop(runner, grace=0, delete_object=False)
                version = listing["metadata"]["resourceVersion"]
                while True:
                    async for event in self.api.watch(
                        "/api/v1/pods", dict(params, resourceVersion=version, timeoutSeconds="300")
                    ):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError(obj.get("code", 500), str(obj.get("message")), "watch pods")
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._on_pod(event["type"], obj)
                        self.last_sync = utcnow()
                    self.last_sync = utcnow()
            except (ApiError, httpx.HTTPError) as exc:
                # 410 Gone (compacted) or a dropped connection: list again.
                log.info("pod watch restarting: %s", exc)
                await asyncio.sleep(1)

    def refresh_scrape_targets(self) -> None:
        """Write the Prometheus file_sd targets of this node's running pods.

        Debian's Prometheus is built without Kubernetes service discovery, so
        the node, which knows each pod's IP and annotations, publishes them."""
        if self.scrape_targets_file is None:
            return
        groups = [
            scrape_target(r.pod, r.view.pod_ip)
            for r in self.pods.values()
            if r.view.pod_ip and not r.stopping.is_set() and any(c.running_since for c in r.view.containers)
        ]
        content = json.dumps([g for g in groups if g is not None], indent=1, sort_keys=True)
        self.scrape_targets_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.scrape_targets_file.with_suffix(".tmp")
        tmp.write_text(content)
        tmp.replace(self.scrape_targets_file)

    # ---- process ----------------------------------------------------------
    def cleanup_leftovers(self) -> None:
        """Remove what a previous, crashed run of this agent left behind."""
        for ns in network.list_netns(self.cfg.netns_prefix):
            network.delete_pod_netns(ns)
        for cgroup in cgroups.remove_tree(self.cgroup_root):
            log.warning("cgroup %s still has processes", cgroup)
        self.cgroup_root.mkdir(parents=True, exist_ok=True)

    async def _health_server(self) -> web.AppRunner:
        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.health_port).start()
        return runner

    async def run(self, stop: asyncio.Event) -> None:
        self.cleanup_leftovers()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self.register()
        health = await self._health_server()
        tasks = [asyncio.create_task(self._lease_loop()), asyncio.create_task(self._watch_pods())]
        log.info("node agent %s running", self.node_name)
        await stop.wait()
        log.info("shutting down: stopping %d pod(s)", len(self.pods))
        for task in tasks:
            task.cancel()
        runners = list(self.pods.values())
        for runner in runners:
            runner.stopping.set()
        await asyncio.gather(*(r.stop(grace=5, delete_object=False) for r in runners), return_exceptions=True)
        self.pods.clear()
        self.refresh_scrape_targets()
        await health.cleanup()
        await self.probe_http.aclose()
        await self.api.close()
