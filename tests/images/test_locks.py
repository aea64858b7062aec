"""The lock files (`make lock`) against pyproject.toml: every dependency an extra names is pinned, at a
version its specifier allows, in that extra's lock; every pin carries hashes (the images and the dev
venv install with --require-hashes); the image locks pin what the dev lock pins. The limiter
comparison's lock (bench/requirements.lock: the agent extra + bench/requirements.in) likewise, and
it pins what the agent image pins."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
LOCKS = {
    "agent": REPO / "agent_image" / "requirements.lock",
    "operator": REPO / "operator" / "requirements.lock",
    "dev": REPO / "requirements-dev.lock",
}
BENCH_IN = REPO / "bench" / "requirements.in"
BENCH_LOCK = REPO / "bench" / "requirements.lock"
# The locks are for CPython 3.11 on Linux x86_64 (hack/lock.sh).
TARGET = {
    **default_environment(),
    "python_version": "3.11",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
}
FIX = "run `make lock` and commit the lock files"


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes), from `name==version [; marker] \\ --hash=... ...` entries."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", line)
        assert m, f"{path.relative_to(REPO)}: not a pin: {line[:80]!r}; {FIX}"
        pins[canonicalize_name(m.group(1))] = (m.group(3), re.findall(r"--hash=(sha256:[0-9a-f]{64})", line))
    return pins


def requirements(extra: str, seen: frozenset[str] = frozenset()) -> list[Requirement]:
    """The extra's requirements, with the project's own extras (`tars-operator[agent]`) expanded."""
    out: list[Requirement] = []
    for spec in PYPROJECT["project"]["optional-dependencies"][extra]:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate(TARGET):
            continue
        if canonicalize_name(req.name) == PROJECT:
            for sub in sorted(req.extras - seen):
                out += requirements(sub, seen | {extra, sub})
        else:
            out.append(req)
    return out + [Requirement(s) for s in PYPROJECT["project"]["dependencies"]]


def test_every_extra_has_a_lock() -> None:
    assert set(PYPROJECT["project"]["optional-dependencies"]) == set(LOCKS)


@pytest.mark.parametrize("extra", sorted(LOCKS))
def test_every_pin_has_hashes(extra: str) -> None:
    pins = parse_lock(LOCKS[extra])
    assert pins, f"{LOCKS[extra]} pins nothing; {FIX}"
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"{LOCKS[extra].relative_to(REPO)}: no --hash for {unhashed}; {FIX}"


@pytest.mark.parametrize("extra", sorted(LOCKS))
def test_every_dependency_is_pinned_within_its_specifier(extra: str) -> None:
    pins = parse_lock(LOCKS[extra])
    lock = LOCKS[extra].relative_to(REPO)
    for req in requirements(extra):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}: pyproject's [{extra}] needs {req}, the lock does not pin it; {FIX}"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock}: pins {name}=={version}, pyproject's [{extra}] wants {req}; {FIX}"
        )


@pytest.mark.parametrize("extra", sorted(LOCKS))
def test_dependency_extras_are_pinned(extra: str) -> None:
    """`httpx[http2]` needs h2 in the lock: read from the installed package's metadata."""
    pins = parse_lock(LOCKS[extra])
    for req in requirements(extra):
        for dep_extra in req.extras:
            try:
                requires = metadata.requires(req.name) or []
            except metadata.PackageNotFoundError:
                # The dev venv is installed from the dev lock, which holds every extra's packages.
                pytest.fail(f"{req.name} is not installed in this venv: run `make setup`", pytrace=False)
            for spec in requires:
                sub = Requirement(spec)
                if (
                    sub.marker
                    and sub.marker.evaluate({**TARGET, "extra": dep_extra})
                    and not (sub.marker.evaluate({**TARGET, "extra": ""}))
                ):
                    assert canonicalize_name(sub.name) in pins, (
                        f"{LOCKS[extra].relative_to(REPO)}: {req} needs {sub.name}, not pinned; {FIX}"
                    )


@pytest.mark.parametrize("extra", ["agent", "operator"])
def test_image_locks_pin_what_the_dev_lock_pins(extra: str) -> None:
    """The tests run in the dev venv: an image must ship the same versions."""
    dev = parse_lock(LOCKS["dev"])
    image = parse_lock(LOCKS[extra])
    differ = {n: (v, dev.get(n, ("missing",))[0]) for n, (v, _) in image.items() if dev.get(n, ("",))[0] != v}
    assert not differ, (
        f"{LOCKS[extra].relative_to(REPO)} vs requirements-dev.lock (image, dev): {differ}; {FIX}"
    )


def test_parse_lock_reads_continuations_and_markers(tmp_path: Path) -> None:
    lock = tmp_path / "r.lock"
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    lock.write_text(
        f"# header\nFoo_Bar==1.2 \\\n    --hash={a} \\\n    --hash={b}\n"
        "    # via x\nbaz==2.0 ; python_version >= '3.11'\n"
    )
    assert parse_lock(lock) == {"foo-bar": ("1.2", [a, b]), "baz": ("2.0", [])}


def bench_requirements() -> list[Requirement]:
    """What the bench venv needs: the agent extra (it runs the agent's code) and bench/requirements.in."""
    lines = (line.split("#", 1)[0].strip() for line in BENCH_IN.read_text().splitlines())
    return requirements("agent") + [Requirement(line) for line in lines if line]


def test_bench_lock_pins_every_bench_requirement_with_hashes() -> None:
    pins = parse_lock(BENCH_LOCK)
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"bench/requirements.lock: no --hash for {unhashed}; {FIX}"
    for req in bench_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"bench/requirements.lock does not pin {req}; {FIX}"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"bench/requirements.lock pins {name}=={pins[name][0]}, the bench wants {req}; {FIX}"
        )


def test_bench_lock_pins_what_the_agent_image_pins() -> None:
    """The bench measures the agent's limiter: with the versions the agent image ships."""
    agent = parse_lock(LOCKS["agent"])
    bench = parse_lock(BENCH_LOCK)
    differ = {n: (v, agent[n][0]) for n, (v, _) in bench.items() if n in agent and agent[n][0] != v}
    missing = sorted(set(agent) - set(bench))
    assert not differ and not missing, (
        f"bench/requirements.lock vs agent_image/requirements.lock: (bench, agent) {differ}, "
        f"not in the bench lock: {missing}; {FIX}"
    )


@pytest.mark.parametrize("extra", ["agent", "operator"])
def test_httpx_finds_sniffio_in_the_images(extra: str) -> None:
    """httpcore imports sniffio on every lock it takes; without it the failed import searched
    sys.path each time, ~55 us and several times per request (3 % of the operator's CPU at 100
    pools, py-spy in bench/README.md operator_scale)."""
    assert "sniffio" in parse_lock(LOCKS[extra]), f"sniffio is not pinned for .[{extra}]; {FIX}"
