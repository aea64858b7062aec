"""Pure helpers that turn a pod spec into what a process needs: environment,
argv, memory limit. No I/O: secrets and config maps are passed in."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 10**-3}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ConfigError(ValueError):
    """The pod asks for something this node cannot give it (CreateContainerConfigError)."""


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("128Mi", "1G", "500m") as a number."""
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ConfigError(f"invalid quantity {value!r}")
    number, suffix = match.groups()
    if suffix in _BINARY_SUFFIXES:
        return float(number) * _BINARY_SUFFIXES[suffix]
    if suffix in _DECIMAL_SUFFIXES:
        return float(number) * _DECIMAL_SUFFIXES[suffix]
    if suffix == "":
        return float(number)
    raise ConfigError(f"invalid quantity suffix in {value!r}")


def memory_limit_bytes(container: JSON) -> int | None:
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    return None if limit is None else int(parse_quantity(limit))


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones
    kept verbatim, and $$ escapes a dollar."""

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(repl, text)


def field_ref(pod: JSON, path: str, host_ip: str, pod_ip: str) -> str:
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
        "status.hostIP": host_ip,
        "status.podIP": pod_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def resource_field_ref(container: JSON, ref: JSON) -> str:
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    value = container.get("resources", {}).get(kind, {}).get(name)
    if value is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(int(-(-parse_quantity(value) // divisor)))


ConfigData = Mapping[tuple[bool, str], Mapping[str, str]]
"""(is_secret, object name) -> that Secret's or ConfigMap's data; absent when not found."""


def referenced_config(container: JSON) -> set[tuple[bool, str]]:
    """The Secrets and ConfigMaps a container's environment needs."""
    refs: set[tuple[bool, str]] = set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            refs.add((False, source["configMapRef"]["name"]))
        if "secretRef" in source:
            refs.add((True, source["secretRef"]["name"]))
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            refs.add((True, source["secretKeyRef"]["name"]))
        if "configMapKeyRef" in source:
            refs.add((False, source["configMapKeyRef"]["name"]))
    return refs


def _kind(is_secret: bool) -> str:
    return "secret" if is_secret else "configmap"


def container_env(
    pod: JSON,
    container: JSON,
    base_env: Mapping[str, str],
    config: ConfigData,
    host_ip: str,
    pod_ip: str,
) -> dict[str, str]:
    """The environment of a container's process, in Kubernetes' order:
    node defaults, envFrom, then env (later entries may refer to earlier ones)."""
    env: dict[str, str] = dict(base_env)
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, is_secret in (("configMapRef", False), ("secretRef", True)):
            if kind in source:
                name = source[kind]["name"]
                data = config.get((is_secret, name))
                if data is None:
                    if source[kind].get("optional"):
                        continue
                    raise ConfigError(f"{_kind(is_secret)} {name!r} not found")
                env.update({prefix + key: value for key, value in data.items()})
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom")
        if source is None:
            env[name] = ""
        elif "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"], host_ip, pod_ip)
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(container, source["resourceFieldRef"])
        else:
            for kind, is_secret in (("secretKeyRef", True), ("configMapKeyRef", False)):
                if kind in source:
                    ref = source[kind]
                    value = config.get((is_secret, ref["name"]), {}).get(ref["key"])
                    if value is None:
                        if ref.get("optional"):
                            break
                        raise ConfigError(
                            f"env {name}: key {ref['key']!r} of {_kind(is_secret)} {ref['name']!r} not found"
                        )
                    env[name] = value
                    break
            else:
                raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


def container_argv(
    container: JSON, env: Mapping[str, str], image_commands: Mapping[str, list[str]]
) -> list[str]:
    """command + args with $(VAR) expanded; the program must exist here.

    This node runs processes, not images: a container without `command` runs
    the entrypoint that `image_commands` maps its image to."""
    command = [expand(c, env) for c in container.get("command", [])]
    args = [expand(a, env) for a in container.get("args", [])]
    if not command:
        image = str(container.get("image", ""))
        repository = image.rsplit("@", 1)[0]
        if ":" in repository.rsplit("/", 1)[-1]:
            repository = repository.rsplit(":", 1)[0]
        mapped = image_commands.get(image) or image_commands.get(repository)
        if not mapped:
            raise ConfigError(
                f"container {container['name']!r} sets no command and image {image!r} has no local "
                "entrypoint: this node runs a container's command as a local process and never pulls images"
            )
        command = list(mapped)
    program = command[0]
    resolved = program if "/" in program else shutil.which(program, path=env.get("PATH"))
    if resolved is None or not os.access(resolved, os.X_OK):
        raise ConfigError(
            f"container {container['name']!r}: executable {program!r} not found on this machine "
            "(the local node runs commands, it does not pull images)"
        )
    return [resolved, *command[1:], *args]
