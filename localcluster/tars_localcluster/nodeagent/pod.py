"""One pod on this node: its sandbox (network namespace, memory cgroups), its
containers as local processes, their probes, restarts and termination."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tars_localcluster import cgroups, network
from tars_localcluster.nodeagent import spec as podspec
from tars_localcluster.nodeagent.api import ApiError
from tars_localcluster.nodeagent.status import ContainerView, PodView, Termination, pod_status

if TYPE_CHECKING:
    from tars_localcluster.nodeagent.agent import NodeAgent

JSON = dict[str, Any]
log = logging.getLogger("nodeagent.pod")
LAUNCHER = Path(__file__).with_name("launch.py")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PodRunner:
    def __init__(self, agent: NodeAgent, pod: JSON) -> None:
        self.agent = agent
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.namespace}/{self.name}"
        spec = pod["spec"]
        self.host_network = bool(spec.get("hostNetwork"))
        self.netns = "-" if self.host_network else network.netns_name(agent.cfg.netns_prefix, self.uid)
        self.cgroup = agent.cgroup_root / self.uid
        self.dir = agent.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.view = PodView(
            host_ip=agent.host_ip,
            pod_ip=None,
            start_time=utcnow(),
            containers=[ContainerView(c["name"], c.get("image", "")) for c in spec["containers"]],
            init_containers=[
                ContainerView(c["name"], c.get("image", "")) for c in spec.get("initContainers", [])
            ],
            initialized=not spec.get("initContainers"),
        )
        # Keep the restart count a pod had before this agent (re)started.
        for views, key in (
            (self.view.containers, "containerStatuses"),
            (self.view.init_containers, "initContainerStatuses"),
        ):
            before = {s["name"]: s for s in pod.get("status", {}).get(key, [])}
            for c in views:
                if c.name in before:
                    c.restart_count = before[c.name].get("restartCount", 0) + int(
                        "running" in before[c.name].get("state", {})
                    )
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()
        self.dirty = asyncio.Event()
        self.conditions: list[JSON] = pod.get("status", {}).get("conditions", [])
        self.tasks: list[asyncio.Task[None]] = []
        self.main: asyncio.Task[None] | None = None
        self.gone = False  # the API object no longer exists

    # ---- lifecycle --------------------------------------------------------
    def start(self) -> None:
        self.main = asyncio.create_task(self._run(), name=f"pod {self.key}")
        self.tasks.append(asyncio.create_task(self._status_writer(), name=f"status {self.key}"))

    def update(self, pod: JSON) -> None:
        old_containers = {c["name"]: c for c in self.pod["spec"]["containers"]}
        self.pod = pod
        # In-place resize: the API server changed a container's memory limit.
        for container in pod["spec"]["containers"]:
            before = old_containers.get(container["name"], {})
            if podspec.memory_limit_bytes(container) != podspec.memory_limit_bytes(before):
                self._apply_memory_limit(container)

    def _apply_memory_limit(self, container: JSON) -> None:
        limit = podspec.memory_limit_bytes(container)
        cgroup = self.cgroup / container["name"]
        if cgroup.exists():
            try:
                (cgroup / "memory.limit_in_bytes").write_text(str(limit if limit is not None else -1))
            except OSError as exc:
                self.agent.event(
                    self.pod, "ResizeFailed", f"memory limit of {container['name']}: {exc}", "Warning"
                )
                return
        for view in self.view.containers:
            if view.name == container["name"]:
                view.memory_limit = limit
        self.dirty.set()

    async def _run(self) -> None:
        spec = self.pod["spec"]
        if self.pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return  # finished before this agent started; nothing to run again
        try:
            await self._setup_sandbox()
        except Exception as exc:
            log.exception("pod %s: sandbox setup failed", self.key)
            self.view.message = f"sandbox setup failed: {exc}"
            self.view.reason = "SandboxFailed"
            self.agent.event(self.pod, "FailedCreatePodSandBox", str(exc), "Warning")
            self.dirty.set()
            return
        self.view.sandbox_ready = True
        self.dirty.set()
        for init_spec, init_view in zip(
            spec.get("initContainers", []), self.view.init_containers, strict=True
        ):
            await self._container_loop(init_spec, init_view, init=True)
            if init_view.terminated is None or init_view.terminated.exit_code != 0 or self.stopping.is_set():
                self.dirty.set()
                return
        self.view.initialized = True
        loops = [
            self._container_loop(c_spec, c_view, init=False)
            for c_spec, c_view in zip(spec["containers"], self.view.containers, strict=True)
        ]
        await asyncio.gather(*loops)

    async def _setup_sandbox(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cgroup.mkdir(parents=True, exist_ok=True)
        if self.host_network:
            self.view.pod_ip = self.agent.host_ip
        else:
            ip = self.agent.ipam.allocate(self.uid)
            await asyncio.to_thread(
                network.create_pod_netns,
                self.netns,
                self.agent.cfg.bridge,
                ip,
                self.agent.cfg.pod_prefix_len,
                self.agent.cfg.gateway_ip,
            )
            self.view.pod_ip = ip
        for c_spec in [*self.pod["spec"].get("initContainers", []), *self.pod["spec"]["containers"]]:
            cgroup = self.cgroup / c_spec["name"]
            cgroup.mkdir(exist_ok=True)
            limit = podspec.memory_limit_bytes(c_spec)
            if limit is not None:
                (cgroup / "memory.limit_in_bytes").write_text(str(limit))
            for view in self.view.containers:
                if view.name == c_spec["name"]:
                    view.memory_limit = limit

    def _restart_wanted(self, exit_code: int, init: bool) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if init:
            return exit_code != 0 and policy != "Never"
        return policy == "Always" or (policy == "OnFailure" and exit_code != 0)

    async def _container_loop(self, c_spec: JSON, view: ContainerView, init: bool) -> None:
        backoff = self.agent.backoff_base
        cgroup = self.cgroup / c_spec["name"]
        while not self.stopping.is_set():
            try:
                argv, env = await self._command(c_spec)
            except podspec.ConfigError as exc:
                view.waiting_reason = "CreateContainerConfigError"
                view.waiting_message = str(exc)
                self.agent.event(self.pod, "Failed", f"container {view.name}: {exc}", "Warning")
                self.dirty.set()
                await self._wait_stop(self.agent.backoff_max)
                continue
            log_path = self.dir / f"{view.name}.log"
            oom_before = cgroups.oom_kills(cgroup)
            started = utcnow()
            with log_path.open("ab") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-I",
                    str(LAUNCHER),
                    self.netns,
                    str(cgroup),
                    c_spec.get("workingDir", ""),
                    "--",
                    *argv,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                )
            self.processes[view.name] = proc
            if view.terminated is not None:
                view.last_terminated = view.terminated
                view.terminated = None
            view.running_since, view.pid, view.will_restart = started, proc.pid, True
            view.waiting_reason, view.waiting_message = "", ""
            view.ready = init or ("readinessProbe" not in c_spec)
            self.agent.event(self.pod, "Started", f"Started container {view.name} (pid {proc.pid})")
            self.dirty.set()
            probes = [] if init else self._start_probes(c_spec, view, proc)
            returncode = await proc.wait()
            for probe in probes:
                probe.cancel()
            cgroups.kill(cgroup)  # children the main process left behind die with it
            self.processes.pop(view.name, None)
            finished = utcnow()
            exit_code = returncode if returncode >= 0 else 128 - returncode
            oom = cgroups.oom_kills(cgroup) > oom_before
            reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
            view.terminated = Termination(
                exit_code=exit_code,
                reason=reason,
                started_at=started,
                finished_at=finished,
                signal=-returncode if returncode < 0 else None,
            )
            view.running_since, view.pid, view.ready = None, None, False
            if oom:
                self.agent.event(
                    self.pod, "OOMKilled", f"container {view.name} exceeded its memory limit", "Warning"
                )
            if self.stopping.is_set() or not self._restart_wanted(exit_code, init):
                view.will_restart = False
                self.dirty.set()
                return
            if (finished - started).total_seconds() > 600:
                backoff = self.agent.backoff_base  # like the kubelet: a long run resets the back-off
            view.waiting_reason = "CrashLoopBackOff"
            view.waiting_message = f"back-off {backoff:.0f}s restarting failed container={view.name}"
            self.agent.event(self.pod, "BackOff", view.waiting_message, "Warning")
            self.dirty.set()
            if await self._wait_stop(backoff):
                view.will_restart = False
                self.dirty.set()
                return
            view.restart_count += 1
            backoff = min(backoff * 2, self.agent.backoff_max)

    async def _wait_stop(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the pod is being stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def _command(self, c_spec: JSON) -> tuple[list[str], dict[str, str]]:
        config: dict[tuple[bool, str], dict[str, str]] = {}
        for is_secret, name in podspec.referenced_config(c_spec):
            kind = "secrets" if is_secret else "configmaps"
            try:
                obj = await self.agent.api.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
            except ApiError as exc:
                if exc.status == 404:
                    continue
                raise podspec.ConfigError(f"reading {kind[:-1]} {name!r}: {exc}") from exc
            data = (
                {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
                if is_secret
                else dict(obj.get("data", {}))
            )
            config[(is_secret, name)] = data
        base = dict(self.agent.base_env)
        base["HOSTNAME"] = self.name
        env = podspec.container_env(
            self.pod, c_spec, base, config, self.agent.host_ip, self.view.pod_ip or ""
        )
        return podspec.container_argv(c_spec, env, self.agent.image_commands), env

    # ---- probes -----------------------------------------------------------
    def _start_probes(
        self, c_spec: JSON, view: ContainerView, proc: asyncio.subprocess.Process
    ) -> list[asyncio.Task[None]]:
        tasks = []
        if "readinessProbe" in c_spec:
            tasks.append(asyncio.create_task(self._probe_loop(c_spec, view, proc, "readiness")))
        if "livenessProbe" in c_spec:
            tasks.append(asyncio.create_task(self._probe_loop(c_spec, view, proc, "liveness")))
        return tasks

    async def _probe_loop(
        self, c_spec: JSON, view: ContainerView, proc: asyncio.subprocess.Process, kind: str
    ) -> None:
        probe = c_spec[f"{kind}Probe"]
        period = probe.get("periodSeconds", 10)
        success_threshold = probe.get("successThreshold", 1)
        failure_threshold = probe.get("failureThreshold", 3)
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        successes = failures = 0
        while proc.returncode is None:
            ok, detail = await self._probe_once(probe, c_spec)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if kind == "readiness":
                if ok and successes >= success_threshold and not view.ready:
                    view.ready = True
                    self.dirty.set()
                elif not ok and failures >= failure_threshold and view.ready:
                    view.ready = False
                    self.dirty.set()
            elif not ok and failures >= failure_threshold:
                self.agent.event(
                    self.pod, "Unhealthy", f"Liveness probe failed: {detail}; restarting", "Warning"
                )
                await self._signal_container(view.name, proc, termination_grace(self.pod))
                return
            if not ok and failures == failure_threshold:
                self.agent.event(
                    self.pod, "Unhealthy", f"{kind.capitalize()} probe failed: {detail}", "Warning"
                )
            await asyncio.sleep(period)

    def _port(self, port: int | str, c_spec: JSON) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c_spec.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"named port {port!r} not found in the container's ports")

    async def _probe_once(self, probe: JSON, c_spec: JSON) -> tuple[bool, str]:
        timeout = probe.get("timeoutSeconds", 1)
        host = self.view.pod_ip or "127.0.0.1"
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                port = self._port(get["port"], c_spec)
                url = f"{scheme}://{get.get('host', host)}:{port}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                resp = await self.agent.probe_http.get(url, headers=headers, timeout=timeout)
                return 200 <= resp.status_code < 400, f"HTTP probe failed with statuscode: {resp.status_code}"
            if "tcpSocket" in probe:
                port = self._port(probe["tcpSocket"]["port"], c_spec)
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                writer.close()
                return True, ""
            if "exec" in probe:
                argv, env = await self._command({**c_spec, "command": probe["exec"]["command"], "args": []})
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-I",
                    str(LAUNCHER),
                    self.netns,
                    str(self.cgroup / c_spec["name"]),
                    "",
                    "--",
                    *argv,
                    env=env,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                try:
                    code = await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    proc.kill()
                    return False, "command timed out"
                return code == 0, f"command exited with {code}"
            return False, "probe has no handler (httpGet, tcpSocket or exec)"
        except (httpx.HTTPError, OSError, TimeoutError, ValueError, podspec.ConfigError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    # ---- termination ------------------------------------------------------
    async def _signal_container(self, name: str, proc: asyncio.subprocess.Process, grace: float) -> None:
        """SIGTERM, wait up to `grace`, then SIGKILL the container's processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            cgroups.kill(self.cgroup / name)
            await proc.wait()

    async def stop(self, grace: float, delete_object: bool) -> None:
        """Stop every container (SIGTERM, `grace` seconds, SIGKILL), release
        the sandbox, then remove the pod object when asked."""
        started = time.monotonic()
        self.stopping.set()
        if self.processes:
            self.agent.event(self.pod, "Killing", f"Stopping containers with a grace period of {grace:.0f}s")
        await asyncio.gather(*(self._signal_container(n, p, grace) for n, p in list(self.processes.items())))
        if self.main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                remaining = max(1.0, grace - (time.monotonic() - started))
                try:
                    await asyncio.wait_for(self.main, remaining + 5)
                except TimeoutError:
                    log.warning("pod %s: runner did not finish; cancelling", self.key)
        await self._flush_status()
        for task in self.tasks:
            task.cancel()
        await self._release_sandbox()
        if delete_object and not self.gone:
            try:
                await self.agent.api.request(
                    "DELETE",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                    body={
                        "kind": "DeleteOptions",
                        "apiVersion": "v1",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": self.uid},
                    },
                    ok=(200, 202, 404, 409),
                )
            except ApiError as exc:
                log.warning("pod %s: final delete failed: %s", self.key, exc)
        log.info("pod %s stopped in %.1fs", self.key, time.monotonic() - started)

    async def _release_sandbox(self) -> None:
        for cgroup in await asyncio.to_thread(cgroups.remove_tree, self.cgroup):
            log.warning("pod %s: cgroup %s is still busy", self.key, cgroup)
        if not self.host_network:
            await asyncio.to_thread(network.delete_pod_netns, self.netns)
            self.agent.ipam.release(self.uid)

    # ---- status -----------------------------------------------------------
    async def _flush_status(self) -> None:
        if self.dirty.is_set() and not self.gone:
            self.dirty.clear()
            await self._write_status()

    async def _status_writer(self) -> None:
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            try:
                await self._write_status()
            except ApiError as exc:
                if exc.status == 404:
                    self.gone = True
                    return
                log.warning("pod %s: status update failed, retrying: %s", self.key, exc)
                self.dirty.set()
                await asyncio.sleep(1)
            except httpx.HTTPError as exc:
                log.warning("pod %s: status update failed, retrying: %s", self.key, exc)
                self.dirty.set()
                await asyncio.sleep(1)

    async def _write_status(self) -> None:
        self.agent.refresh_scrape_targets()
        status = pod_status(self.view, self.conditions, utcnow())
        self.conditions = status["conditions"]
        await self.agent.api.patch(
            f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status", {"status": status}
        )


def termination_grace(pod: JSON) -> float:
    return float(pod["spec"].get("terminationGracePeriodSeconds", 30))
