from pathlib import Path
from typing import Any

import pytest
import yaml

from tars_operator import crd

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_generator() -> None:
    assert (ROOT / "crds" / "agentpool.yaml").read_text() == crd.render(), "run python -m tars_operator.crd"


def test_check_flag_detects_stale_file(tmp_path: Path) -> None:
    target = tmp_path / "agentpool.yaml"
    assert crd.main(["--check", "--output", str(target)]) == 1
    assert crd.main(["--output", str(target)]) == 0
    assert crd.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text() + "# edited\n")
    assert crd.main(["--check", "--output", str(target)]) == 1


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Every violation of the structural-schema rules (and of our bounds) below `node`."""
    errors = [
        f"{path}: {key}" for key in ("$ref", "anyOf", "oneOf", "allOf", "title", "nullable") if key in node
    ]
    if "type" not in node:
        errors.append(f"{path}: no type")
    if node.get("type") == "string" and not {"maxLength", "enum", "format"} & node.keys():
        errors.append(f"{path}: unbounded string")
    if node.get("type") == "array" and "maxItems" not in node:
        errors.append(f"{path}: unbounded array")
    if node.get("additionalProperties") is True or node.get("additionalProperties") is False:
        errors.append(f"{path}: boolean additionalProperties")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: properties with additionalProperties")
    for name, sub in node.get("properties", {}).items():
        errors += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        errors += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        errors += _walk(node["additionalProperties"], f"{path}{{}}")
    return errors


@pytest.fixture(scope="module")
def version() -> dict[str, Any]:
    versions: list[dict[str, Any]] = yaml.safe_load(crd.render())["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def test_schema_is_structural_and_bounded(version: dict[str, Any]) -> None:
    schema = version["schema"]["openAPIV3Schema"]
    errors = _walk(schema["properties"]["spec"], "spec") + _walk(schema["properties"]["status"], "status")
    assert errors == []


def test_walk_catches_violations() -> None:
    bad = {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}, "b": {"type": "string"}}}
    assert _walk(bad, "x") == ["x.a: anyOf", "x.a: no type", "x.b: unbounded string"]


def test_structural_refuses_untyped_nodes() -> None:
    with pytest.raises(ValueError, match="needs a type"):
        crd._structural({"properties": {}}, "x")
    with pytest.raises(ValueError, match="anyOf"):
        crd._structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "x")


def _rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_cross_field_rules_and_defaults(version: dict[str, Any]) -> None:
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert _rules(spec) == ["self.warm.min <= self.replicas.max"]
    assert _rules(props["replicas"]) == ["self.min <= self.max"]
    assert _rules(props["memory"]) == ["quantity(self.min).compareTo(quantity(self.max)) <= 0"]
    # A whole defaulted object, not {}: the server checks a default against the CEL rules.
    assert props["replicas"]["default"] == {"min": 1, "max": 10}
    assert props["rotation"]["properties"]["ttl"]["default"] == "30m"
    assert props["scaling"]["properties"]["queueDepth"]["properties"]["threshold"]["default"] == 50
    assert spec["required"] == ["template"]
    containers = props["template"]["properties"]["spec"]["properties"]["containers"]
    assert containers["minItems"] == 1
    assert props["template"]["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["memory"]["properties"]["targetUtilization"] == {
        "type": "number",
        "default": 0.7,
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 0.75,
    }


def test_conditions_are_a_list_map(version: dict[str, Any]) -> None:
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_subresources_names_and_columns(version: dict[str, Any]) -> None:
    doc = yaml.safe_load(crd.render())
    assert doc["metadata"]["name"] == "agentpools.tars.dev"
    assert doc["spec"]["names"]["shortNames"] == ["ap"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas.min",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Desired", "Ready", "Warm", "Busy", "Queue", "Age"]
