"""The container images the local cluster's node runs, built here without Docker or a registry.

`build()` builds the images of the table `IMAGES` that are missing or whose inputs changed and keeps
one OCI archive per image in $TARS_CACHE/images/ (`<name>.oci.tar`, with `<name>.json`: the hash of
its inputs, its digest); `import_into()` imports into a containerd the archives whose digest it does
not have yet, under the refs of the table. Three kinds of image:

* `DebianImage`: a Debian root filesystem made by mmdebstrap, packed by umoci. `python` is the local
  stand-in for python:3.11-slim-bookworm: Debian's python3 with a venv at /opt/python first on PATH,
  so `python` and `pip` (and `pip install`) work as in the official image.
* `DockerfileImage`: one of our Dockerfiles, built by buildah (chroot isolation, storage in the
  cache) with `--build-arg BASE_IMAGE=<the python image>`. pip inside the build reaches the package
  index as pip does on this machine: the host's CA bundle and index settings are mounted read-only
  over the base's (they never end up in the image).
* `StaticImage`: files without a base (a program and its shared libraries, /etc/passwd), packed by
  umoci: pause (compiled from Kubernetes' pause.c), Redis (Debian's redis-server from this machine),
  and the Go programs `make cluster-build` puts into $TARS_CACHE/bin.

Images marked `on_demand` (KEDA's, for `make bench-keda`) are built and imported only when named:
`build()` and `import_into()` without names, and so `make cluster-up`, leave them out.

CLI: `python -m tars_localcluster.images build [NAME...] [--force]`,
`... import --address SOCKET [--namespace k8s.io] [NAME...]`, `... list`.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from tars_localcluster import procs
from tars_localcluster.config import LOCALCLUSTER_DIR, cache_dir, read_versions
from tars_localcluster.procs import ClusterError

REPO = LOCALCLUSTER_DIR.parent
Log: TypeAlias = Callable[[str], None]

# Part of every image's input hash: bump it when a change in this file changes what an image is
# made of, and every image is rebuilt once.
RECIPE = "1"

PYTHON_VENV = "/opt/python"
# Where pip in the python image reads its site config (the venv's), and the system CA bundle it
# trusts: a build mounts this machine's settings over both.
PIP_CONF = f"{PYTHON_VENV}/pip.conf"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
STATIC_PATH = "/usr/local/bin:/usr/bin:/bin"


class ImageError(ClusterError):
    """A failure with a message that names the cause and the fix (a ClusterError: the cluster's CLI
    prints it as such)."""


# ---------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class DebianImage:
    """mmdebstrap --variant=minbase SUITE with PACKAGES, then the CUSTOMIZE hooks (shell, "$1" is the
    root filesystem); packed by umoci with ENV and CMD."""

    name: str
    ref: str
    suite: str
    packages: tuple[str, ...]
    customize: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] = ()
    runtime: bool = False  # imported into the node's containerd by import_into()


@dataclass(frozen=True)
class DockerfileImage:
    """A Dockerfile of this repository (build context: the repository root), FROM the image `base`
    of the table (passed as --build-arg BASE_IMAGE)."""

    name: str
    ref: str
    dockerfile: str
    base: str
    runtime: bool = True


@dataclass(frozen=True)
class CacheBinary:
    """$TARS_CACHE/bin/NAME, built by BUILT_BY; when that wrote bin/.NAME.version, it must say
    VERSION."""

    name: str
    version: str | None = None
    built_by: str = "`make cluster-build`"


@dataclass(frozen=True)
class HostProgram:
    """A program installed on this machine (found on PATH), with the shared libraries it loads. Its
    `--version` output must contain VERSION_MATCH (the image's tag says which version it is)."""

    command: str
    package: str
    version_match: str | None = None


@dataclass(frozen=True)
class Text:
    content: str


@dataclass(frozen=True)
class StaticC:
    """A C file of a Go module in the module cache (downloaded by `make cluster-build`), compiled with
    `gcc -Os -static`. The module's version is versions.env's VERSION_KEY."""

    module: str
    version_key: str
    path: str
    defines: tuple[tuple[str, str], ...] = ()


Source: TypeAlias = CacheBinary | HostProgram | Text | StaticC


@dataclass(frozen=True)
class File:
    path: str
    source: Source
    mode: int = 0o755


@dataclass(frozen=True)
class Dir:
    path: str
    uid: int = 0
    gid: int = 0
    mode: int = 0o755


@dataclass(frozen=True)
class StaticImage:
    """FILES (and DIRS) without a base image. /etc/passwd and /etc/group name root, nobody and USERS
    (uid, name, home; the group has the same id)."""

    name: str
    ref: str
    files: tuple[File, ...]
    user: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    dirs: tuple[Dir, ...] = ()
    users: tuple[tuple[int, str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = (("PATH", STATIC_PATH),)
    workdir: str = "/"
    ports: tuple[str, ...] = ()
    runtime: bool = True
    on_demand: bool = False  # built and imported only when named (see the module's docstring)


Image: TypeAlias = DebianImage | DockerfileImage | StaticImage


def project_version() -> str:
    """pyproject.toml's version: the tag of the operator and agent images (the chart's appVersion)."""
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


VERSION = project_version()
# The Go programs' versions: versions.env's (what build.sh builds and the add-on manifests name),
# these defaults while it has none.
_PINS = read_versions()
COREDNS_VERSION = _PINS.get("COREDNS_VERSION", "v1.15.0")
PROMETHEUS_VERSION = _PINS.get("PROMETHEUS_VERSION", "v3.16.0")
PROMETHEUS_OPERATOR_VERSION = _PINS.get("PROMETHEUS_OPERATOR_VERSION", "v0.93.1")
# hack/build-keda.sh's default: the KEDA the scale-reaction benchmark runs against.
KEDA_VERSION = "v2.21.0"
KEDA_BUILD = "`hack/build-keda.sh` (`make bench-keda` runs it)"

# The config a Prometheus started without one reads (the prometheus-operator passes its own).
PROMETHEUS_YML = """\
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["localhost:9090"]
"""

IMAGES: tuple[Image, ...] = (
    DebianImage(
        name="python",
        ref="localhost/tars/python:3.11-bookworm",
        suite="bookworm",
        packages=("python3", "python3-venv", "ca-certificates"),
        customize=(
            f'chroot "$1" python3 -m venv {PYTHON_VENV}',
            # mmdebstrap clamps the tarball's mtimes to its start, which makes the bytecode of files
            # written since (the venv's) stale: compile it again, checked against nothing.
            f'chroot "$1" {PYTHON_VENV}/bin/python -m compileall -q -f --invalidation-mode unchecked-hash'
            f" {PYTHON_VENV}/lib",
            # pip trusts the system's CA store, as Debian's own pip does.
            f"printf '[global]\\ncert = {CA_BUNDLE}\\n' > \"$1\"{PIP_CONF}",
            # The runtime provides these; the rest is log and cache.
            'rm -f "$1"/etc/resolv.conf "$1"/etc/hostname',
            'rm -rf "$1"/var/log/apt "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log'
            ' "$1"/var/cache/ldconfig/aux-cache',
        ),
        env=(
            ("PATH", f"{PYTHON_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            ("LANG", "C.UTF-8"),
        ),
        cmd=("python3",),
        runtime=False,
    ),
    DockerfileImage(
        "tars-agent", f"ghcr.io/tars-dev/tars-agent:{VERSION}", "agent_image/Dockerfile", base="python"
    ),
    DockerfileImage(
        "tars-operator", f"ghcr.io/tars-dev/tars-operator:{VERSION}", "operator/Dockerfile", base="python"
    ),
    StaticImage(
        "pause",
        "localhost/tars/pause:3.10",
        files=(
            File(
                "/pause",
                StaticC(
                    "k8s.io/kubernetes",
                    "KUBERNETES_VERSION",
                    "build/pause/linux/pause.c",
                    (("VERSION", "3.10"),),
                ),
            ),
        ),
        entrypoint=("/pause",),
        user="65535:65535",
        env=(),
    ),
    StaticImage(
        "redis",
        "localhost/tars/redis:7.0-bookworm",
        files=(
            File("/usr/bin/redis-server", HostProgram("redis-server", "redis-server", "v=7.0.")),
            File("/usr/bin/redis-cli", HostProgram("redis-cli", "redis-tools", " 7.0.")),
        ),
        # /data is a volume (the chart mounts one); the root filesystem is read-only.
        dirs=(Dir("/data", 999, 999), Dir("/tmp", mode=0o1777)),
        users=((999, "redis", "/data"),),
        user="999:999",
        cmd=("redis-server",),
        workdir="/data",
        ports=("6379/tcp",),
    ),
    StaticImage(
        "coredns",
        f"localhost/tars/coredns:{COREDNS_VERSION}",
        files=(File("/coredns", CacheBinary("coredns", COREDNS_VERSION)),),
        users=((65532, "nonroot", "/home/nonroot"),),
        # As upstream's image: non-root, so port 53 needs unprivileged ports in the pod's network
        # namespace (containerd 2's CRI default, enable_unprivileged_ports) or NET_BIND_SERVICE.
        user="65532:65532",
        entrypoint=("/coredns",),
        ports=("53/udp", "53/tcp", "9153/tcp"),
    ),
    StaticImage(
        "prometheus",
        f"localhost/tars/prometheus:{PROMETHEUS_VERSION}",
        files=(
            File("/bin/prometheus", CacheBinary("prometheus", PROMETHEUS_VERSION)),
            File("/bin/promtool", CacheBinary("promtool", PROMETHEUS_VERSION)),
            File("/etc/prometheus/prometheus.yml", Text(PROMETHEUS_YML), 0o644),
        ),
        # The TSDB needs a writable volume at /prometheus (mounted at run time).
        dirs=(Dir("/prometheus", 65534, 65534),),
        user="65534:65534",
        entrypoint=("/bin/prometheus",),
        cmd=("--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"),
        workdir="/prometheus",
        ports=("9090/tcp",),
    ),
    StaticImage(
        "prometheus-config-reloader",
        f"localhost/tars/prometheus-config-reloader:{PROMETHEUS_OPERATOR_VERSION}",
        files=(
            File(
                "/bin/prometheus-config-reloader",
                CacheBinary("prometheus-config-reloader", PROMETHEUS_OPERATOR_VERSION),
            ),
        ),
        user="65534:65534",
        entrypoint=("/bin/prometheus-config-reloader",),
        ports=("8080/tcp",),
    ),
    StaticImage(
        "prometheus-operator",
        f"localhost/tars/prometheus-operator:{PROMETHEUS_OPERATOR_VERSION}",
        files=(File("/bin/operator", CacheBinary("prometheus-operator", PROMETHEUS_OPERATOR_VERSION)),),
        user="65534:65534",
        entrypoint=("/bin/operator",),
        ports=("8080/tcp",),
    ),
    # As upstream's images (distroless/static:nonroot): the program at the same path, uid 65532.
    # The operator runs on a read-only root; the adapter (an aggregated API server) too, with an
    # emptyDir at /tmp for what it writes there.
    StaticImage(
        "keda-operator",
        f"localhost/tars/keda:{KEDA_VERSION}",
        files=(File("/keda", CacheBinary("keda-operator", KEDA_VERSION, KEDA_BUILD)),),
        users=((65532, "nonroot", "/home/nonroot"),),
        user="65532:65532",
        entrypoint=("/keda",),
        ports=("8080/tcp", "8081/tcp", "9666/tcp"),
        on_demand=True,
    ),
    StaticImage(
        "keda-adapter",
        f"localhost/tars/keda-metrics-apiserver:{KEDA_VERSION}",
        files=(File("/keda-adapter", CacheBinary("keda-adapter", KEDA_VERSION, KEDA_BUILD)),),
        users=((65532, "nonroot", "/home/nonroot"),),
        user="65532:65532",
        entrypoint=("/keda-adapter",),
        ports=("6443/tcp", "8080/tcp"),
        on_demand=True,
    ),
)
BY_NAME: dict[str, Image] = {image.name: image for image in IMAGES}


# ---------------------------------------------------------------------------------------------------
# Where things are


def images_dir() -> Path:
    return cache_dir() / "images"


def archive_path(name: str) -> Path:
    """The OCI archive of image NAME (`ctr images import` reads it)."""
    return images_dir() / f"{name}.oci.tar"


def stamp_path(name: str) -> Path:
    return images_dir() / f"{name}.json"


@dataclass(frozen=True)
class Built:
    name: str
    ref: str
    digest: str  # the manifest's, as `ctr images ls` shows it
    archive: Path
    size: int  # bytes of the archive (compressed layers)
    rebuilt: bool
    seconds: float


def read_stamp(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(stamp_path(name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def on_demand(image: Image) -> bool:
    return isinstance(image, StaticImage) and image.on_demand


def select(names: Iterable[str] | None, *, with_bases: bool = True) -> list[Image]:
    """The images NAMES (when None: all but the on-demand ones), with the images they are built
    FROM, in table order."""
    wanted = {i.name for i in IMAGES if not on_demand(i)} if names is None else set(names)
    unknown = sorted(wanted - set(BY_NAME))
    if unknown:
        raise ImageError(f"unknown image(s) {', '.join(unknown)}; the images are: {', '.join(BY_NAME)}")
    if with_bases:
        for name in list(wanted):
            image = BY_NAME[name]
            while isinstance(image, DockerfileImage):
                wanted.add(image.base)
                image = BY_NAME[image.base]
    return [image for image in IMAGES if image.name in wanted]


# ---------------------------------------------------------------------------------------------------
# Small helpers


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def require_tool(tool: str) -> str:
    return procs.require_tool(tool, ImageError)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "building images needs root (mmdebstrap, buildah and umoci run as root); run as root"
        )


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def _run(
    argv: Sequence[str],
    *,
    what: str,
    fix: str,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run ARGV; its output goes to LOG_FILE (if given) and is returned. A failure raises ImageError
    with WHAT failed, the output's tail and FIX."""
    require_tool(argv[0])
    proc = subprocess.run(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(proc.stdout)
    if proc.returncode != 0:
        where = f" (whole output: {log_file})" if log_file else ""
        raise ImageError(
            f"{what} failed (exit {proc.returncode}){where}; the last lines:\n{_tail(proc.stdout)}\n{fix}"
        )
    return proc.stdout


@contextlib.contextmanager
def _step(log: Log, name: str, what: str, *, announce: str = "") -> Iterator[None]:
    """Log WHAT with the time it took; a long step (ANNOUNCE: how long it takes) is logged first too."""
    if announce:
        log(f"[images] {name}:   {what} ... ({announce})")
    started = time.monotonic()
    yield
    log(f"[images] {name}:   {what} ({time.monotonic() - started:.1f}s)")


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One build at a time (a test fixture and `make images` may both ask)."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with (images_dir() / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------
# Inputs: what an image is made of, each with a digest. The image is rebuilt when one changes.


def dockerfile_sources(dockerfile: Path) -> list[str]:
    """The build-context paths a Dockerfile's COPY/ADD instructions read (not those --from a stage)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources: list[str] = []
    for line in text.splitlines():
        words = line.strip().split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(arg.startswith("--from") for arg in args):
            continue
        args = [arg for arg in args if not arg.startswith("--")]
        if args and args[0].startswith("["):
            args = [str(a) for a in json.loads(" ".join(args))]
        sources += args[:-1]
    return sources


def _context_files(source: str) -> list[Path]:
    path = REPO / source
    if not path.exists():
        raise ImageError(f"the Dockerfile copies {source}, which does not exist in {REPO}")
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def _file_digest(path: Path) -> str:
    mode = "x" if os.access(path, os.X_OK) else "-"
    return sha256(mode.encode() + path.read_bytes())


def _recipe_digest(image: Image) -> str:
    return sha256(json.dumps([RECIPE, repr(image)]).encode())


def _dockerfile_inputs(image: DockerfileImage) -> dict[str, str]:
    base = read_stamp(image.base)
    if base is None:
        raise ImageError(f"{image.name}: its base image {image.base} is not built")
    inputs = {
        "recipe": _recipe_digest(image),
        f"base {BY_NAME[image.base].ref}": str(base["digest"]),
        image.dockerfile: _file_digest(REPO / image.dockerfile),
    }
    ignore = REPO / ".dockerignore"
    if ignore.exists():
        inputs[".dockerignore"] = _file_digest(ignore)
    for source in dockerfile_sources(REPO / image.dockerfile):
        for path in _context_files(source):
            inputs[str(path.relative_to(REPO))] = _file_digest(path)
    return inputs


@dataclass(frozen=True)
class Entry:
    """One member of a static image's layer."""

    path: str
    data: bytes | None  # None: a directory
    mode: int
    uid: int = 0
    gid: int = 0


def shared_libraries(program: Path) -> list[str]:
    """The shared libraries (and the loader) PROGRAM needs, as ldd resolves them on this machine."""
    proc = subprocess.run(
        [require_tool("ldd"), str(program)], capture_output=True, text=True, errors="replace", check=False
    )
    if "not a dynamic executable" in proc.stdout + proc.stderr or "statically linked" in proc.stdout:
        return []
    if proc.returncode != 0:
        raise ImageError(f"ldd {program} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    libraries: list[str] = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise ImageError(f"{program} needs {line.split()[0]}, which is not installed here")
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"(/\S+)", line)
        if m:
            libraries.append(m.group(1))
    return libraries


def _check_binary_version(binary: CacheBinary, path: Path) -> None:
    if binary.version is None:
        return
    stamp = path.parent / f".{binary.name}.version"
    try:
        built = stamp.read_text().strip()
    except FileNotFoundError:
        return
    if built.lstrip("v") != binary.version.lstrip("v"):
        raise ImageError(
            f"{path} is version {built}, the image table (tars_localcluster/images.py) says"
            f" {binary.version}: make them agree (update the table's tag or run {binary.built_by})"
        )


def _compile_static_c(source: StaticC) -> tuple[bytes, str]:
    """(the program, the digest of what it is made of); compiled once per input into the cache."""
    versions = read_versions()
    version = versions.get(source.version_key)
    if version is None:
        raise ImageError(f"versions.env has no {source.version_key}")
    c_file = go_module_dir(source.module, version) / source.path
    if not c_file.exists():
        raise ImageError(
            f"{c_file} is missing: it comes with the {source.module} {version} module that"
            " `make cluster-build` downloads; run `make cluster-build` first"
        )
    gcc = require_tool("gcc")
    flags = ["-Os", "-Wall", "-Werror", "-static", "-s", *(f"-D{k}={v}" for k, v in source.defines)]
    gcc_version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = sha256(json.dumps([c_file.read_text(), flags, gcc_version.splitlines()[:1]]).encode())
    out = images_dir() / "work" / "compiled" / digest.split(":")[1][:16] / Path(source.path).stem
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(
            [gcc, *flags, "-o", str(out) + ".tmp", str(c_file)],
            what=f"compiling {c_file}",
            fix="gcc -static needs the C library's static files: apt-get install -y libc6-dev",
        )
        os.replace(str(out) + ".tmp", out)
    return out.read_bytes(), digest


def go_module_dir(module: str, version: str) -> Path:
    """Where Go's module cache (filled by `make cluster-build`) keeps MODULE@VERSION."""
    modcache = os.environ.get("GOMODCACHE") or str(
        Path(os.environ.get("GOPATH") or Path.home() / "go") / "pkg/mod"
    )
    # The cache escapes capitals as !lower (github.com/BurntSushi -> github.com/!burnt!sushi).
    escaped = re.sub(r"[A-Z]", lambda m: "!" + m.group(0).lower(), module)
    return Path(modcache) / f"{escaped}@{version}"


def _passwd(users: Sequence[tuple[int, str, str]]) -> tuple[bytes, bytes]:
    everyone = [(0, "root", "/root"), *users, (65534, "nobody", "/nonexistent")]
    passwd = "".join(f"{name}:x:{uid}:{uid}:{name}:{home}:/sbin/nologin\n" for uid, name, home in everyone)
    group = "".join(f"{'nogroup' if uid == 65534 else name}:x:{uid}:\n" for uid, name, _ in everyone)
    return passwd.encode(), group.encode()


def static_entries(image: StaticImage) -> tuple[list[Entry], dict[str, str]]:
    """The layer of a static image, and its inputs (path in the image -> digest of what is there)."""
    entries: list[Entry] = []
    inputs: dict[str, str] = {"recipe": _recipe_digest(image)}
    for file in image.files:
        source = file.source
        if isinstance(source, Text):
            data = source.content.encode()
            entries.append(Entry(file.path, data, file.mode))
            inputs[file.path] = sha256(data)
        elif isinstance(source, StaticC):
            data, digest = _compile_static_c(source)
            entries.append(Entry(file.path, data, file.mode))
            inputs[file.path] = digest
        else:
            if isinstance(source, CacheBinary):
                path = cache_dir() / "bin" / source.name
                if not path.exists():
                    raise ImageError(
                        f"{image.name}: {path} is not built yet; run {source.built_by}, which builds it"
                    )
                _check_binary_version(source, path)
            else:
                found = shutil.which(source.command)
                if found is None:
                    raise ImageError(
                        f"{image.name}: `{source.command}` is not installed here;"
                        f" install it with: apt-get install -y {source.package} (`make setup` does)"
                    )
                path = Path(found)
                if source.version_match:
                    out = subprocess.run(
                        [str(path), "--version"], capture_output=True, text=True, check=False
                    )
                    if source.version_match not in out.stdout:
                        raise ImageError(
                            f"{image.name}: {path} --version says {out.stdout.strip()!r}, the image's tag"
                            f" {image.ref} wants {source.version_match.strip()}: install Debian 12's"
                            f" {source.package} or change the table in tars_localcluster/images.py"
                        )
            data = path.read_bytes()
            entries.append(Entry(file.path, data, file.mode))
            inputs[file.path] = sha256(data)
            for library in shared_libraries(path):
                if library not in inputs:
                    lib_data = Path(library).read_bytes()
                    entries.append(Entry(library, lib_data, 0o755))
                    inputs[library] = sha256(lib_data)
    passwd, group = _passwd(image.users)
    entries += [Entry("/etc/passwd", passwd, 0o644), Entry("/etc/group", group, 0o644)]
    entries += [Entry(d.path, None, d.mode, d.uid, d.gid) for d in image.dirs]
    return entries, inputs


def write_layer(entries: Iterable[Entry], out: Path) -> None:
    """An uncompressed, reproducible layer tarball: parents first, sorted, owned by root unless an
    entry says otherwise, mtime 0."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        parts = entry.path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            by_path.setdefault(parent, Entry(parent, None, 0o755))
        by_path["/" + "/".join(parts)] = entry
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(by_path):
            entry = by_path[path]
            info = tarfile.TarInfo(path.lstrip("/"))
            info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.gid, 0
            if entry.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))


def _debian_inputs(image: DebianImage) -> dict[str, str]:
    return {"recipe": _recipe_digest(image)}


def inputs_of(image: Image) -> dict[str, str]:
    """What IMAGE is made of: a label (a path, mostly) -> its digest."""
    if isinstance(image, DockerfileImage):
        return _dockerfile_inputs(image)
    if isinstance(image, StaticImage):
        return static_entries(image)[1]
    return _debian_inputs(image)


def inputs_hash(inputs: Mapping[str, str]) -> str:
    return sha256(json.dumps(dict(sorted(inputs.items()))).encode())


def why_rebuild(stamp: Mapping[str, Any] | None, inputs: Mapping[str, str], ref: str) -> str | None:
    """Why an image with this STAMP must be built again; None when it is up to date."""
    if stamp is None:
        return "not built yet"
    if stamp.get("ref") != ref:
        return f"its ref changed from {stamp.get('ref')}"
    if stamp.get("hash") == inputs_hash(inputs):
        return None
    old = stamp.get("inputs") or {}
    changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return f"inputs changed: {shown}"


# ---------------------------------------------------------------------------------------------------
# OCI layouts and archives


def _umoci_image(layer: Path, layout: Path, config: Sequence[str], name: str) -> None:
    """A one-layer OCI image in LAYOUT (tag `image`) from the tarball LAYER, configured by CONFIG
    (`umoci config` flags)."""
    shutil.rmtree(layout, ignore_errors=True)
    fix = "umoci is Debian's `umoci` package"
    _run(["umoci", "init", "--layout", str(layout)], what=f"{name}: umoci init", fix=fix)
    _run(["umoci", "new", "--image", f"{layout}:image"], what=f"{name}: umoci new", fix=fix)
    _run(
        ["umoci", "raw", "add-layer", "--image", f"{layout}:image", str(layer)],
        what=f"{name}: umoci raw add-layer",
        fix=fix,
    )
    _run(
        ["umoci", "config", "--image", f"{layout}:image", "--author=tars-operator images.py", *config],
        what=f"{name}: umoci config",
        fix=fix,
    )


def _blob(layout: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexdigest


def write_archive(layout: Path, ref: str, out: Path) -> None:
    """An OCI archive of LAYOUT's first manifest, named REF (so that `ctr images import` and
    `buildah pull` name it REF), with only the blobs it needs."""
    index = json.loads((layout / "index.json").read_text())
    manifest_desc = dict(index["manifests"][0])
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref}
    manifest = json.loads(_blob(layout, manifest_desc["digest"]).read_text())
    blobs = [
        manifest_desc["digest"],
        manifest["config"]["digest"],
        *(layer["digest"] for layer in manifest["layers"]),
    ]
    new_index = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:

        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add_bytes("oci-layout", (layout / "oci-layout").read_bytes())
        add_bytes("index.json", new_index)
        for digest in dict.fromkeys(blobs):
            path = _blob(layout, digest)
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(layout)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with path.open("rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)


def archive_manifest(archive: Path) -> tuple[str, str | None]:
    """(manifest digest, ref name) of an OCI archive's first image."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise ImageError(f"{archive} has no index.json: not an OCI archive")
        index = json.loads(member.read())
    desc = index["manifests"][0]
    return str(desc["digest"]), (desc.get("annotations") or {}).get("org.opencontainers.image.ref.name")


# ---------------------------------------------------------------------------------------------------
# buildah


class Buildah:
    """buildah with its own storage in the cache: overlay when the kernel and the file system allow
    it (fast, small), else vfs (a full copy per layer)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._driver: str | None = None
        self.policy = home / "policy.json"
        self.tmp = home / "tmp"

    def _paths(self, driver: str) -> list[str]:
        return [
            "--root",
            str(self.home / driver / "root"),
            "--runroot",
            str(self.home / driver / "run"),
            "--storage-driver",
            driver,
        ]

    @property
    def driver(self) -> str:
        if self._driver is None:
            choice = self.home / "driver"
            if choice.exists():
                self._driver = choice.read_text().strip()
            else:
                require_tool("buildah")
                self.home.mkdir(parents=True, exist_ok=True)
                probe = subprocess.run(
                    ["buildah", *self._paths("overlay"), "images"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                self._driver = "overlay" if probe.returncode == 0 else "vfs"
                choice.write_text(self._driver + "\n")
        return self._driver

    def argv(self, *args: str) -> list[str]:
        return ["buildah", *self._paths(self.driver), *args]

    def env(self) -> dict[str, str]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        if not self.policy.exists():
            self.policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        return {**os.environ, "TMPDIR": str(self.tmp), "BUILDAH_ISOLATION": "chroot"}

    def run(self, *args: str, what: str, fix: str, log_file: Path | None = None) -> str:
        return _run(self.argv(*args), what=what, fix=fix, log_file=log_file, env=self.env())

    def image_digest(self, ref: str) -> str | None:
        proc = subprocess.run(
            self.argv("inspect", "--type", "image", "--format", "{{.FromImageDigest}}", ref),
            capture_output=True,
            text=True,
            env=self.env(),
            check=False,
        )
        if proc.returncode != 0:
            return None
        return proc.stdout.strip() or None

    def prune(self) -> None:
        """Remove working containers and untagged images: the archives are what we keep."""
        for args in (("rm", "--all"), ("rmi", "--prune")):
            subprocess.run(self.argv(*args), capture_output=True, env=self.env(), check=False)


def pip_settings(
    environ: Mapping[str, str], config_files: Sequence[Path]
) -> tuple[dict[str, str], Path | None]:
    """pip's settings on this machine that a build inside a container needs too: the index (URLs,
    trusted hosts, timeout, retries, proxy) from pip's config files and PIP_* variables, and the CA
    bundle pip trusts here (`cert`, else $SSL_CERT_FILE, else the system's)."""
    keys = {"index-url", "extra-index-url", "trusted-host", "timeout", "retries", "proxy", "cert"}
    aliases = {"default-timeout": "timeout"}
    settings: dict[str, str] = {}
    for path in config_files:
        parser = configparser.RawConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(path)
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    key = aliases.get(key.replace("_", "-"), key.replace("_", "-"))
                    if key in keys:
                        settings[key] = value
    for name, value in environ.items():
        if name.startswith("PIP_") and value:
            key = name[4:].lower().replace("_", "-")
            key = aliases.get(key, key)
            if key in keys:
                settings[key] = value
    cert_candidates = [settings.pop("cert", ""), environ.get("SSL_CERT_FILE", ""), CA_BUNDLE]
    ca = next((Path(c) for c in cert_candidates if c and Path(c).is_file()), None)
    return settings, ca


def pip_conf_text(settings: Mapping[str, str]) -> str:
    lines = ["[global]", f"cert = {CA_BUNDLE}"]
    lines += [f"{key} = {value}" for key, value in sorted(settings.items())]
    return "\n".join(lines) + "\n"


def _pip_config_files() -> list[Path]:
    home = Path.home()
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    return [
        Path("/etc/xdg/pip/pip.conf"),
        Path("/etc/pip.conf"),
        home / ".pip/pip.conf",
        Path(xdg) / "pip/pip.conf",
    ]


# ---------------------------------------------------------------------------------------------------
# Building one image


def _host_sources(suite: str) -> str:
    """The mirror for mmdebstrap: this machine's apt sources when they are for SUITE."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        with contextlib.suppress(OSError):
            if re.search(rf"\b{re.escape(suite)}\b", path.read_text()):
                return str(path)
    return "http://deb.debian.org/debian"


def _without_device_nodes(rootfs: Path, out: Path) -> None:
    """mmdebstrap's tarball has /dev's nodes; the runtime makes its own /dev."""
    with tarfile.open(rootfs) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            if member.name.startswith("./dev/") and member.name.rstrip("/") != "./dev":
                continue
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)


def _build_debian(image: DebianImage, work: Path, log: Log) -> None:
    _require_root()
    rootfs = work / "rootfs.tar"
    mirror = _host_sources(image.suite)
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        # merged /usr with symlinks, without the usrmerge package (and the perl it pulls in)
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        f"--include={','.join(image.packages)}",
        *(
            f"--dpkgopt=path-{kind}={path}"
            for kind, path in (
                ("exclude", "/usr/share/man/*"),
                ("exclude", "/usr/share/doc/*"),
                ("include", "/usr/share/doc/*/copyright"),
                ("exclude", "/usr/share/locale/*"),
                ("exclude", "/usr/share/info/*"),
            )
        ),
        *(f"--customize-hook={hook}" for hook in image.customize),
        image.suite,
        str(rootfs),
        mirror,
    ]
    what = f"mmdebstrap {image.suite} + {', '.join(image.packages)} (mirror: {mirror})"
    with _step(log, image.name, what, announce="2-3 min"):
        _run(
            argv,
            what=f"{image.name}: mmdebstrap",
            fix=f"check that this machine reaches the Debian mirror in {mirror} (`apt-get update` does)",
            log_file=work / "mmdebstrap.log",
        )
    layer = work / "layer.tar"
    with _step(log, image.name, "umoci: layer + config"):
        _without_device_nodes(rootfs, layer)
        rootfs.unlink()
        config = [f"--config.env={k}={v}" for k, v in image.env] + [f"--config.cmd={c}" for c in image.cmd]
        _umoci_image(layer, work / "layout", config, image.name)
    with _step(log, image.name, "OCI archive"):
        write_archive(work / "layout", image.ref, archive_path(image.name))


def _build_static(image: StaticImage, entries: list[Entry], work: Path, log: Log) -> None:
    _require_root()
    layer = work / "layer.tar"
    with _step(log, image.name, f"layer ({len(entries)} files) + umoci"):
        write_layer(entries, layer)
        config = [f"--config.user={image.user}", f"--config.workingdir={image.workdir}"]
        config += [f"--config.entrypoint={a}" for a in image.entrypoint]
        config += [f"--config.cmd={a}" for a in image.cmd]
        config += [f"--config.env={k}={v}" for k, v in image.env]
        config += [f"--config.exposedports={p}" for p in image.ports]
        _umoci_image(layer, work / "layout", config, image.name)
    with _step(log, image.name, "OCI archive"):
        write_archive(work / "layout", image.ref, archive_path(image.name))


def _pip_failure(name: str, output: str, dockerfile: str) -> str | None:
    steps = re.findall(r"^STEP \d+/\d+: (.*)$", output, re.M)
    if steps and steps[-1].startswith("RUN") and "pip install" in steps[-1]:
        return (
            f"{name}: `{steps[-1]}` failed inside the build ({dockerfile}); pip's last lines:\n"
            f"{_tail(output, 30)}\n"
            "Fix: a network error means the package index is not reachable from the build (it uses this"
            " machine's pip settings and CA bundle); a hash mismatch or a missing pin means the lock is"
            " stale: `make lock`."
        )
    return None


def _build_dockerfile(image: DockerfileImage, buildah: Buildah, work: Path, log: Log) -> None:
    _require_root()
    buildah.prune()  # what an interrupted build left
    base = BY_NAME[image.base]
    base_stamp = read_stamp(base.name) or {}
    want = base_stamp.get("digest")
    if buildah.image_digest(base.ref) != want:
        with _step(log, image.name, f"load {base.ref} into buildah ({buildah.driver} storage)"):
            buildah.run(
                "pull",
                "--signature-policy",
                str(buildah.policy),
                "--quiet",
                f"oci-archive:{archive_path(base.name)}",
                what=f"{image.name}: buildah pull of {base.ref}",
                fix=f"rebuild the base: python -m tars_localcluster.images build --force {base.name}",
            )
    settings, ca = pip_settings(os.environ, _pip_config_files())
    pip_conf = work / "pip.conf"
    pip_conf.write_text(pip_conf_text(settings))
    mounts = ["-v", f"{pip_conf}:{PIP_CONF}:ro"]
    if ca is not None:
        mounts += ["-v", f"{ca}:{CA_BUNDLE}:ro"]
    log_file = work / "build.log"
    argv = buildah.argv(
        "bud",
        "--signature-policy",
        str(buildah.policy),
        "--pull=never",
        "--isolation=chroot",
        "--layers=false",
        "--force-rm",
        "--format=oci",
        f"--build-arg=BASE_IMAGE={base.ref}",
        *mounts,
        "-f",
        image.dockerfile,
        "-t",
        image.ref,
        ".",
    )
    with _step(
        log, image.name, f"buildah bud -f {image.dockerfile} (FROM {base.ref})", announce="about a minute"
    ):
        proc = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=buildah.env(),
            cwd=REPO,
        )
        log_file.write_text(proc.stdout)
        if proc.returncode != 0:
            buildah.prune()
            raise ImageError(
                _pip_failure(image.name, proc.stdout, image.dockerfile)
                or f"{image.name}: buildah bud -f {image.dockerfile} failed (whole output: {log_file});"
                f" the last lines:\n{_tail(proc.stdout)}"
            )
    with _step(log, image.name, "OCI archive (buildah push)"):
        tmp = work / "image.oci.tar"
        buildah.run(
            "push",
            "--signature-policy",
            str(buildah.policy),
            "--quiet",
            image.ref,
            f"oci-archive:{tmp}:{image.ref}",
            what=f"{image.name}: buildah push",
            fix="see buildah's message above",
        )
        os.replace(tmp, archive_path(image.name))
    # The archive is what we keep; the store keeps only the bases.
    subprocess.run(buildah.argv("rmi", image.ref), capture_output=True, env=buildah.env(), check=False)
    buildah.prune()


def _build_one(image: Image, buildah: Buildah, force: bool, log: Log) -> Built:
    started = time.monotonic()
    entries: list[Entry] = []
    if isinstance(image, StaticImage):
        entries, inputs = static_entries(image)
    else:
        inputs = inputs_of(image)
    stamp = read_stamp(image.name)
    archive = archive_path(image.name)
    reason = why_rebuild(stamp, inputs, image.ref)
    if reason is None and not archive.exists():
        reason = f"{archive} is missing"
    if reason is None and force:
        reason = "forced"
    if reason is None and stamp is not None:
        log(f"[images] {image.name}: up to date ({image.ref}, {stamp['digest'][:19]})")
        return Built(image.name, image.ref, str(stamp["digest"]), archive, archive.stat().st_size, False, 0.0)
    log(f"[images] {image.name}: building ({reason})")
    work = images_dir() / "work" / image.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if isinstance(image, DebianImage):
        _build_debian(image, work, log)
    elif isinstance(image, DockerfileImage):
        _build_dockerfile(image, buildah, work, log)
    else:
        _build_static(image, entries, work, log)
    digest, _ = archive_manifest(archive)
    seconds = time.monotonic() - started
    size = archive.stat().st_size
    stamp_path(image.name).write_text(
        json.dumps(
            {
                "ref": image.ref,
                "digest": digest,
                "hash": inputs_hash(inputs),
                "inputs": inputs,
                "size": size,
                "seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=1,
        )
        + "\n"
    )
    shutil.rmtree(work, ignore_errors=True)
    log(f"[images] {image.name}: built in {seconds:.1f}s ({image.ref}, {_mib(size)}, {digest[:19]})")
    return Built(image.name, image.ref, digest, archive, size, True, seconds)


def build(names: Iterable[str] | None = None, *, force: bool = False, log: Log = print) -> dict[str, Built]:
    """Build the images NAMES (default: all but the on-demand ones) and the bases they are built
    FROM, each only when it is missing or its inputs changed (FORCE: the named ones anyway). Keeps
    going past a failure and then raises ImageError naming every image that failed and why."""
    named = None if names is None else set(names)
    images = select(named)
    wanted = {i.name for i in images} if named is None else named
    buildah = Buildah(images_dir() / "buildah")
    built: dict[str, Built] = {}
    failed: dict[str, str] = {}
    started = time.monotonic()
    with _lock():
        for image in images:
            if isinstance(image, DockerfileImage) and image.base in failed:
                failed[image.name] = f"its base {image.base} failed"
                log(f"[images] {image.name}: skipped ({failed[image.name]})")
                continue
            try:
                built[image.name] = _build_one(image, buildah, force and image.name in wanted, log)
            except ImageError as exc:
                failed[image.name] = str(exc).removeprefix(f"{image.name}: ")
                log(f"[images] {image.name}: FAILED: {failed[image.name]}")
    if failed:
        raise ImageError(
            f"{len(failed)} image(s) failed: {', '.join(failed)}\n"
            + "\n".join(f"- {name}: {why.splitlines()[0]}" for name, why in failed.items())
        )
    log(f"[images] {len(built)} image(s) ready in {time.monotonic() - started:.1f}s ({images_dir()})")
    return built


# ---------------------------------------------------------------------------------------------------
# containerd


def find_ctr(ctr: str | None = None) -> str:
    """CTR, else the cache's ctr (containerd 2, from `make cluster-build`), else the one on PATH."""
    if ctr:
        return ctr
    cached = cache_dir() / "bin" / "ctr"
    if cached.exists():
        return str(cached)
    return require_tool("ctr")


def parse_ctr_images(output: str) -> dict[str, str]:
    """`ctr images ls` -> {ref: digest} (the header, and any warning ctr prints, have no digest)."""
    images: dict[str, str] = {}
    for line in output.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[2].startswith("sha256:"):
            images[cols[0]] = cols[2]
    return images


def containerd_images(
    containerd_address: str, namespace: str = "k8s.io", *, ctr: str | None = None
) -> dict[str, str]:
    """The images a containerd has in NAMESPACE: {ref: manifest digest}."""
    argv = [find_ctr(ctr), "--address", containerd_address, "--namespace", namespace, "images", "ls"]
    proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        raise ImageError(
            f"listing the images of the containerd at {containerd_address} failed: {proc.stderr.strip()}\n"
            "Is that containerd running (`make cluster-up` starts the node's) and is the address its socket?"
        )
    return parse_ctr_images(proc.stdout)


def import_into(
    containerd_address: str,
    namespace: str = "k8s.io",
    names: Iterable[str] | None = None,
    *,
    ctr: str | None = None,
    snapshotter: str | None = None,
    log: Log = print,
) -> list[str]:
    """Import the images NAMES (default: every image the node runs) from their archives into the
    containerd at CONTAINERD_ADDRESS, under their refs, unpacked for SNAPSHOTTER (default: the
    containerd's); only those whose digest it does not have yet. Returns the refs imported."""
    images = [i for i in select(names, with_bases=False) if names is not None or i.runtime]
    ctr_bin = find_ctr(ctr)
    have = containerd_images(containerd_address, namespace, ctr=ctr_bin)
    imported: dict[str, str] = {}  # ref -> digest
    missing: list[Image] = []
    for image in images:
        archive = archive_path(image.name)
        if not archive.exists():
            missing.append(image)
            continue
        digest, _ = archive_manifest(archive)
        if have.get(image.ref) == digest:
            log(f"[images] {image.name}: containerd has {image.ref} ({digest[:19]})")
            continue
        argv = [ctr_bin, "--address", containerd_address, "--namespace", namespace, "images", "import"]
        if snapshotter:
            argv += ["--snapshotter", snapshotter]
        with _step(log, image.name, f"imported {image.ref} ({digest[:19]})"):
            _run(
                [*argv, str(archive)],
                what=f"ctr images import {archive}",
                fix=f"rebuild the image: python -m tars_localcluster.images build --force {image.name}",
            )
        imported[image.ref] = digest
    if imported:
        now = containerd_images(containerd_address, namespace, ctr=ctr_bin)
        for ref, digest in imported.items():
            if now.get(ref) != digest:
                raise ImageError(f"after the import, containerd names {ref} {now.get(ref)}, not {digest}")
    if missing:
        names_missing = " ".join(i.name for i in missing)
        raise ImageError(
            f"not built, so not imported: {names_missing} (the others were); build them first:"
            f" `make images` (or python -m tars_localcluster.images build {names_missing})"
        )
    return list(imported)


# ---------------------------------------------------------------------------------------------------
# CLI


def _list(log: Log) -> None:
    for image in IMAGES:
        stamp = read_stamp(image.name)
        state = (
            f"built {stamp['built_at']}  {_mib(int(stamp['size'])):>10}  {stamp['digest'][:19]}"
            if stamp and archive_path(image.name).exists()
            else "not built"
        )
        log(f"{image.name:<28} {image.ref:<52} {state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tars_localcluster.images", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build what is missing or changed (default: every image)")
    b.add_argument("names", nargs="*", metavar="NAME", help=f"of: {', '.join(BY_NAME)}")
    b.add_argument("--force", action="store_true", help="rebuild the named images even when up to date")
    i = sub.add_parser("import", help="import the built images into a containerd (only what it lacks)")
    i.add_argument("names", nargs="*", metavar="NAME")
    i.add_argument("--address", required=True, help="the containerd's socket")
    i.add_argument("--namespace", default="k8s.io")
    i.add_argument("--ctr", help="the ctr binary (default: $TARS_CACHE/bin/ctr, else ctr on PATH)")
    i.add_argument("--snapshotter")
    sub.add_parser("list", help="the images, their refs and what is built")
    args = parser.parse_args(argv)

    def command() -> None:
        if args.command == "build":
            build(args.names or None, force=args.force)
        elif args.command == "import":
            import_into(
                args.address, args.namespace, args.names or None, ctr=args.ctr, snapshotter=args.snapshotter
            )
        else:
            _list(print)

    return procs.exit_code("images", command)


if __name__ == "__main__":
    sys.exit(main())
