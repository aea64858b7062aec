"""Fixtures for the chart tests: the helm binary and a renderer returning parsed objects.

No test here is skipped: without helm (or promtool) they fail and say how to get it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tars_localcluster.config import cached_tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tars-operator"
VALUES_ALL = Path(__file__).resolve().parent / "values-all.yaml"
# Every render names the Kubernetes version the project runs (helm's default is the one it was
# built against; test_template_renders_as_gitops_tools_run_it_without_a_kube_version covers that).
KUBE_VERSION = "1.37.0"
RELEASE = "t"
NAMESPACE = "tars-system"

Obj = dict[str, Any]
Render = Callable[..., list[Obj]]


def find_helm() -> str:
    found = cached_tool("helm", os.environ.get("HELM"))
    if found is None:
        pytest.fail(
            "helm not found (looked at $HELM, $TARS_CACHE/bin/helm and PATH): run `make cluster-build`, "
            "which builds it into ~/.cache/tars-operator/bin/helm",
            pytrace=False,
        )
    return found


def find_promtool() -> str:
    found = cached_tool("promtool")
    if found is None:
        pytest.fail(
            "promtool not found ($TARS_CACHE/bin/promtool, PATH): run `make cluster-build`, which builds "
            "it with Prometheus into ~/.cache/tars-operator/bin",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def helm() -> str:
    return find_helm()


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_promtool()


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def render(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Render:
    """render(values=None, *files, include_crds=False) -> the rendered objects (None documents dropped)."""
    counter = iter(range(1_000_000))

    def _render(values: Obj | None = None, *files: Path, include_crds: bool = False) -> list[Obj]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
        for f in files:
            args += ["-f", str(f)]
        if values is not None:
            path = tmp_path_factory.getbasetemp() / f"values-{next(counter)}.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["-f", str(path)]
        if include_crds:
            args.append("--include-crds")
        out = run_helm(helm, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render


def render_error(helm: str, tmp_path: Path, values: Obj) -> str:
    """Render with `values` expecting a refusal; returns helm's error text."""
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        "-f",
        str(path),
        check=False,
    )
    assert proc.returncode != 0, f"helm accepted {values!r}"
    return proc.stderr


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]
