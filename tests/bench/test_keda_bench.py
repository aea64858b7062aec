"""The pure parts of bench/keda_vs_operator.py and bench/keda_install.py: both contenders run the
same agent pods on the same query, KEDA's knobs are what each contender says, the certificates
match the address the adapter dials, and the reaction times come out of a timeline as defined."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import keda_install
from keda_vs_operator import CONTENDERS, THRESHOLD, Config, Killed, Run, Sample, keda_objects, reaction, table
from tars_localcluster.kubectl import Kubectl
from tars_operator import builders, models, queries

NS = "bench"
CFG = Config(Kubectl("kubectl", "kubeconfig"), "agent:1", [], 400, 2.0, 1.5, 60, 300, Path("out"))


def _keda(name: str) -> dict[str, Any]:
    objects = keda_objects(CFG, CONTENDERS[name], NS, "redis://r:6379/0", "pw", "http://prom:9090")
    return {o["kind"]: o for o in objects}


def test_the_keda_deployment_runs_the_pods_the_operator_would_create_on_its_query() -> None:
    objects = _keda("keda-5s")
    spec = models.AgentPoolSpec.model_validate(
        {"template": objects["Deployment"]["spec"]["template"], "scaling": {"queueDepth": {"threshold": 50}}}
    )
    pod = builders.render(
        builders.PoolRef("keda-5s", NS, uid="x"),
        spec,
        None,
        builders.OperatorDefaults("redis://r:6379/0", redis_password=True),
    )
    deployed = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert deployed["image"] == pod["spec"]["containers"][0]["image"] == "agent:1"
    # The same environment, Secret names aside (they carry the pool's uid).
    names = {e["name"] for e in deployed["env"]}
    assert names == {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    secret_name = objects["Secret"]["metadata"]["name"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in deployed["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {secret_name}
    trigger = objects["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["metadata"]["query"] == queries.queue_depth(spec, "keda-5s", NS)
    assert trigger["metadata"]["threshold"] == str(THRESHOLD)
    assert "ownerReferences" not in objects["Secret"]["metadata"]


def test_keda_defaults_are_left_to_keda_and_the_tuned_variant_sets_its_knobs() -> None:
    default = _keda("keda-default")["ScaledObject"]["spec"]
    assert not {"pollingInterval", "cooldownPeriod", "advanced"} & set(default)
    tuned = _keda("keda-5s")["ScaledObject"]["spec"]
    assert (tuned["pollingInterval"], tuned["cooldownPeriod"]) == (5, 30)
    behavior = tuned["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 30


def test_the_certificate_names_the_address_the_adapter_dials_and_serves_both_ways() -> None:
    names = keda_install.service_names()
    certs = keda_install.certificates(names)
    cert = x509.load_pem_x509_certificate(certs.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert "keda-operator.keda.svc.cluster.local" in sans  # --metrics-service-address's default host
    assert "keda-metrics-apiserver.keda.svc" in sans  # what the aggregator dials for the APIService
    usage = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usage == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.ca_pem))
    adapter = next(
        o
        for o in keda_install.workloads(keda_install.Images("o", "a"), certs)
        if o["kind"] == "Deployment" and o["metadata"]["name"] == keda_install.ADAPTER
    )
    args = adapter["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--metrics-service-address={names[0]}:9666" in args


def test_rbac_is_trimmed_to_what_runs() -> None:
    rules = [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["validatingwebhookconfigurations"],
            "verbs": ["patch"],
        },
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "update", "watch"]},
        {"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["get", "patch"]},
    ]
    assert keda_install.trimmed_rules(rules) == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch"]},
        {"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["get", "patch"]},
    ]


def test_reaction_measures_from_the_crossing() -> None:
    run = Run("keda-default", burst_at=100.0, initial_pods={"a", "b", "c"})
    queue = [0, 0, 380, 390, 300, 120, 0, 0]
    desired = [3, 3, 3, 3, 8, 8, 8, 3]
    for i, (q, d) in enumerate(zip(queue, desired, strict=True)):
        run.samples.append(Sample(99.0 + i * 10, q, d, 3, 3))
    run.ready_at = {"a": 90.0, "b": 90.0, "c": 90.0, "d": 145.0, "e": 150.0}
    run.deleted = [Killed("d", 170.0, 1), Killed("e", 171.0, 0), Killed("old", 50.0, 1)]
    r = reaction(run)
    assert r.crossing == 119.0
    assert (r.decision, r.first_ready, r.drained) == (20.0, 26.0, 40.0)
    assert (r.peak_desired, r.deleted, r.busy_killed) == (8, 2, 1)


def _run(name: str, round_no: int, decision_after_s: float) -> Run:
    """A run whose queue crosses at t=110 and whose desired count rises `decision_after_s` later."""
    run = Run(name, round=round_no, burst_at=100.0)
    run.samples = [Sample(100.0, 0, 3, 3, 3), Sample(110.0, 400, 3, 3, 3)]
    run.samples.append(Sample(110.0 + decision_after_s, 400, 8, 3, 3))
    return run


def test_the_table_lists_every_round_and_compares_medians() -> None:
    runs = [
        _run("operator", 1, 1.0),
        _run("keda-default", 1, 12.0),
        _run("operator", 2, 3.0),
        _run("keda-default", 2, 4.0),
        _run("operator", 3, 2.0),
        _run("keda-default", 3, 8.0),
    ]
    text = table(runs)
    rows = [line.split()[:3] for line in text.splitlines() if re.match(r"(operator|keda-default) +\d", line)]
    assert rows[:2] == [["operator", "1", "1.0"], ["keda-default", "1", "12.0"]] and len(rows) == 6
    # medians 2.0 s and 8.0 s: not the ratio of any one pair of rounds
    assert "operator decides 4.0x sooner than keda-default (medians of 3 rounds)" in text


def test_a_condition_counts_only_when_true_and_a_fresh_object_has_none() -> None:
    established = {"status": {"conditions": [{"type": "Established", "status": "True"}]}}
    assert keda_install.condition_true(established, "Established")
    assert not keda_install.condition_true(established, "Available")
    assert not keda_install.condition_true(
        {"status": {"conditions": [{"type": "Available", "status": "False"}]}}, "Available"
    )
    assert not keda_install.condition_true({"metadata": {"name": "just-created"}}, "Established")
    assert not keda_install.condition_true({"status": {"conditions": None}}, "Established")
