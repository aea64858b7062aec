"""The image pipeline's pure parts (tars_localcluster.images): the table and the names the chart and
examples use, the Dockerfiles' contract, input hashing, layers, archives, pip settings. Nothing here
runs buildah, umoci or containerd (`make images` does)."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from tars_localcluster import images
from tars_localcluster.config import read_versions
from tars_localcluster.images import (
    CacheBinary,
    Dir,
    Entry,
    File,
    ImageError,
    StaticImage,
    Text,
)

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DOCKERFILES = {"tars-agent": "agent_image/Dockerfile", "tars-operator": "operator/Dockerfile"}


def test_the_refs() -> None:
    operator_version = images.PROMETHEUS_OPERATOR_VERSION
    assert {i.name: i.ref for i in images.IMAGES} == {
        "python": "localhost/tars/python:3.11-bookworm",
        "tars-agent": f"ghcr.io/tars-dev/tars-agent:{VERSION}",
        "tars-operator": f"ghcr.io/tars-dev/tars-operator:{VERSION}",
        "pause": "localhost/tars/pause:3.10",
        "redis": "localhost/tars/redis:7.0-bookworm",
        "coredns": f"localhost/tars/coredns:{images.COREDNS_VERSION}",
        "prometheus": f"localhost/tars/prometheus:{images.PROMETHEUS_VERSION}",
        "prometheus-config-reloader": f"localhost/tars/prometheus-config-reloader:{operator_version}",
        "prometheus-operator": f"localhost/tars/prometheus-operator:{operator_version}",
        "keda-operator": f"localhost/tars/keda:{images.KEDA_VERSION}",
        "keda-adapter": f"localhost/tars/keda-metrics-apiserver:{images.KEDA_VERSION}",
    }
    # The Go programs' tags are versions.env's pins (the add-on manifests name them from there).
    pins = read_versions()
    for key, default in [
        ("COREDNS_VERSION", "v1.15.0"),
        ("PROMETHEUS_VERSION", "v3.16.0"),
        ("PROMETHEUS_OPERATOR_VERSION", "v0.93.1"),
    ]:
        assert getattr(images, key) == pins.get(key, default)
    # The base is only built FROM; the node runs the others.
    assert [i.name for i in images.IMAGES if not i.runtime] == ["python"]


def test_keda_images_are_built_only_when_named() -> None:
    """`make cluster-up` builds every image but KEDA's, which only `make bench-keda` needs."""
    keda = {"keda-operator", "keda-adapter"}
    assert keda.isdisjoint(i.name for i in images.select(None))
    assert {i.name for i in images.select(sorted(keda))} == keda


def test_the_chart_and_examples_name_the_images_we_build() -> None:
    chart = yaml.safe_load((REPO / "helm/tars-operator/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "helm/tars-operator/values.yaml").read_text())
    assert f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}" == (
        images.BY_NAME["tars-operator"].ref
    )
    agent = images.BY_NAME["tars-agent"].ref
    for example in (REPO / "examples").glob("*.yaml"):
        for ref in re.findall(r"image:\s*(ghcr\.io/tars-dev/tars-agent\S*)", example.read_text()):
            assert ref == agent, example


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_contract(name: str) -> None:
    text = (REPO / DOCKERFILES[name]).read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm\nFROM ${BASE_IMAGE}\n" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^ENV HOME=/tmp", text, re.M)
    assert "python -m compileall" in text
    assert "docker build -f " + DOCKERFILES[name] in text  # the header says how to build it
    sources = images.dockerfile_sources(REPO / DOCKERFILES[name])
    lock = next(s for s in sources if s.endswith("requirements.lock"))
    assert (REPO / lock).is_file()
    assert re.search(r"pip install --no-deps --require-hashes -r /app/requirements\.lock", text)
    for source in sources:
        assert (REPO / source).exists(), source
    packages = {Path(s).name for s in sources if (REPO / s).is_dir()}
    # Both carry the contract; the operator image carries no agent runtime.
    expected = {"tars_contract", "tars_agent" if name == "tars-agent" else "tars_operator"}
    assert packages == expected


def test_the_agent_runs_the_worker_and_the_operator_tars_operator() -> None:
    agent = (REPO / DOCKERFILES["tars-agent"]).read_text()
    operator = (REPO / DOCKERFILES["tars-operator"]).read_text()
    assert 'CMD ["python", "-m", "tars_agent.worker"]' in agent
    assert "/usr/local/bin/tars-operator" in operator and 'CMD ["tars-operator"]' in operator


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines  # nothing else goes into the build context
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for dockerfile in DOCKERFILES.values():
        for source in images.dockerfile_sources(REPO / dockerfile):
            assert source.rstrip("/") in kept, source


def test_dockerfile_sources_parses_flags_continuations_and_json(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        'FROM x AS build\nCOPY --chown=1:1 a b \\\n   /dst/\nADD ["c d", "/e"]\nCOPY --from=build /x /y\n'
    )
    assert images.dockerfile_sources(dockerfile) == ["a", "b", "c d"]


def test_select_adds_the_base_and_keeps_table_order() -> None:
    assert [i.name for i in images.select(["tars-operator", "tars-agent"])] == [
        "python",
        "tars-agent",
        "tars-operator",
    ]
    assert [i.name for i in images.select(["tars-agent"], with_bases=False)] == ["tars-agent"]
    with pytest.raises(ImageError, match=r"unknown image\(s\) nope; the images are: python, "):
        images.select(["nope"])


def test_why_rebuild_names_the_changed_inputs() -> None:
    inputs = {"recipe": "sha256:1", "a.py": "sha256:2", "b.py": "sha256:3"}
    stamp = {"ref": "r:1", "hash": images.inputs_hash(inputs), "inputs": inputs}
    assert images.why_rebuild(stamp, dict(inputs), "r:1") is None
    assert images.why_rebuild(None, inputs, "r:1") == "not built yet"
    assert images.why_rebuild(stamp, inputs, "r:2") == "its ref changed from r:1"
    changed = {**inputs, "b.py": "sha256:4", "c.py": "sha256:5"}
    changed.pop("a.py")
    assert images.why_rebuild(stamp, changed, "r:1") == "inputs changed: a.py, b.py, c.py"
    many = {f"f{i}.py": "x" for i in range(9)}
    assert images.why_rebuild(stamp, {**inputs, **many}, "r:1") == (
        "inputs changed: f0.py, f1.py, f2.py, f3.py, f4.py, f5.py and 3 more"
    )


def test_dockerfile_inputs_follow_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_CACHE", str(tmp_path))
    image = images.BY_NAME["tars-agent"]
    with pytest.raises(ImageError, match="its base image python is not built"):
        images.inputs_of(image)
    (tmp_path / "images").mkdir()
    images.stamp_path("python").write_text(json.dumps({"digest": "sha256:base1"}))
    inputs = images.inputs_of(image)
    assert inputs["base localhost/tars/python:3.11-bookworm"] == "sha256:base1"
    assert {
        "agent_image/Dockerfile",
        "agent_image/requirements.lock",
        "agent_image/tars_agent/worker.py",
    } <= set(inputs)
    assert not [k for k in inputs if "__pycache__" in k or k.endswith(".pyc")]
    worker = (REPO / "agent_image/tars_agent/worker.py").read_bytes()
    assert inputs["agent_image/tars_agent/worker.py"] == "sha256:" + hashlib.sha256(b"-" + worker).hexdigest()
    images.stamp_path("python").write_text(json.dumps({"digest": "sha256:base2"}))
    assert images.inputs_hash(images.inputs_of(image)) != images.inputs_hash(inputs)


def test_static_image_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_CACHE", str(tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (bin_dir / ".tool.version").write_text("v1.2.3\n")
    image = StaticImage(
        "t",
        "localhost/t:1",
        files=(File("/bin/tool", CacheBinary("tool", "1.2.3")), File("/etc/t.conf", Text("x=1\n"), 0o644)),
        dirs=(Dir("/data", 999, 999, 0o750),),
        users=((999, "svc", "/data"),),
        user="999:999",
    )
    entries, inputs = images.static_entries(image)
    assert set(inputs) == {"recipe", "/bin/tool", "/etc/t.conf"}
    layer = tmp_path / "layer.tar"
    images.write_layer(entries, layer)
    first = layer.read_bytes()
    images.write_layer(reversed(entries), layer)
    assert layer.read_bytes() == first  # reproducible
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar}
        assert list(members) == sorted(members)
        assert members["bin"].isdir() and members["bin/tool"].mode == 0o755
        assert (members["data"].uid, members["data"].gid, members["data"].mode) == (999, 999, 0o750)
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None
        assert passwd.read().decode().splitlines() == [
            "root:x:0:0:root:/root:/sbin/nologin",
            "svc:x:999:999:svc:/data:/sbin/nologin",
            "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin",
        ]

    (bin_dir / ".tool.version").write_text("v2.0.0\n")
    with pytest.raises(ImageError, match=r"is version v2\.0\.0, the image table .* says 1\.2\.3"):
        images.static_entries(image)
    (bin_dir / "tool").unlink()
    with pytest.raises(ImageError, match=r"bin/tool is not built yet; run `make cluster-build`"):
        images.static_entries(image)


def test_host_programs_bring_their_libraries() -> None:
    libraries = images.shared_libraries(Path("/bin/sh"))
    assert any("libc.so" in lib for lib in libraries)
    assert any("ld-linux" in lib for lib in libraries)


def test_write_archive_names_the_ref_and_keeps_only_reachable_blobs(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config, layer = blob(b"{}"), blob(b"layer")
    blob(b"garbage")
    manifest = blob(json.dumps({"schemaVersion": 2, "config": config, "layers": [layer]}).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [{**manifest, "annotations": {"x": "image"}}]})
    )
    archive = tmp_path / "a.oci.tar"
    images.write_archive(layout, "ghcr.io/x/y:1", archive)
    assert images.archive_manifest(archive) == (manifest["digest"], "ghcr.io/x/y:1")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert sorted(names) == sorted(
        [
            "oci-layout",
            "index.json",
            *(f"blobs/{d['digest']}".replace(":", "/") for d in (config, layer, manifest)),
        ]
    )


def test_pip_settings_carry_the_index_and_the_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("cert")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\ncert = {ca}\nindex-url = https://mirror/simple\nfind-links = /opt/wheels\n")
    settings, found = images.pip_settings(
        {"PIP_DEFAULT_TIMEOUT": "180", "PIP_FIND_LINKS": "/opt/wheels", "PIP_TRUSTED_HOST": "mirror"}, [conf]
    )
    assert found == ca
    assert settings == {"index-url": "https://mirror/simple", "timeout": "180", "trusted-host": "mirror"}
    text = images.pip_conf_text(settings)
    assert text.startswith(f"[global]\ncert = {images.CA_BUNDLE}\n")
    assert "index-url = https://mirror/simple\n" in text and "find-links" not in text
    # An environment variable wins over a file; SSL_CERT_FILE is the fallback for the CA.
    settings, found = images.pip_settings(
        {"PIP_INDEX_URL": "https://other/simple", "SSL_CERT_FILE": str(ca)}, [tmp_path / "missing.conf"]
    )
    assert settings == {"index-url": "https://other/simple"} and found == ca


def test_parse_ctr_images() -> None:
    out = (
        "REF                               TYPE                                       DIGEST"
        "                                                                  SIZE     PLATFORMS   LABELS\n"
        "ghcr.io/tars-dev/tars-agent:0.1.0 application/vnd.oci.image.manifest.v1+json sha256:0a69"
        " 65.7 MiB linux/amd64 -\n"
        "localhost/tars/pause:3.10 application/vnd.oci.image.manifest.v1+json sha256:fc67"
        " 316.4 KiB linux/amd64 -\n"
    )
    assert images.parse_ctr_images(out) == {
        "ghcr.io/tars-dev/tars-agent:0.1.0": "sha256:0a69",
        "localhost/tars/pause:3.10": "sha256:fc67",
    }


def test_go_images_say_how_to_get_their_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_CACHE", str(tmp_path))
    monkeypatch.setattr(images, "_require_root", lambda: None)
    logged: list[str] = []
    with pytest.raises(ImageError) as failure:
        images.build(["coredns"], log=logged.append)
    assert "coredns" in str(failure.value) and "make cluster-build" in str(failure.value)
    assert any(line.startswith("[images] coredns: FAILED: ") for line in logged)
    with pytest.raises(ImageError) as failure:
        images.build(["keda-adapter"], log=logged.append)
    assert "hack/build-keda.sh" in str(failure.value)


def test_go_module_dir_escapes_capitals_as_the_module_cache_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOMODCACHE", str(tmp_path))
    assert (
        images.go_module_dir("github.com/BurntSushi/toml", "v1")
        == tmp_path / "github.com/!burnt!sushi/toml@v1"
    )


def test_image_errors_are_cluster_errors() -> None:
    from tars_localcluster.procs import ClusterError

    assert issubclass(ImageError, ClusterError)


def test_entry_defaults() -> None:
    entry = Entry("/x", b"", 0o644)
    assert (entry.uid, entry.gid) == (0, 0)
