"""Generate the AgentPool CustomResourceDefinition from the pydantic models.

`python -m tars_operator.crd` writes crds/agentpool.yaml; `--check` exits 1 when the file
differs from what the models generate (CI runs it, and a test does the same).

The API server wants a *structural* schema (apiextensions.k8s.io/v1): every node typed,
no `$ref`, no `anyOf` over null, `x-kubernetes-preserve-unknown-fields` instead of
`additionalProperties: true`, and OpenAPI v3.0's boolean `exclusiveMinimum`. `_structural`
rewrites pydantic's JSON Schema into that form and refuses what it cannot translate,
so a model change that would produce an invalid CRD fails here, not at `kubectl apply`.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tars_operator import models

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "agentpool.yaml"

# Keys pydantic emits that carry no meaning for the API server (or that we rewrite).
_DROPPED = {"title", "$defs"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every `$ref` (our models have no recursion, so this terminates)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _resolve(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        siblings = {k: _resolve(v, defs) for k, v in node.items() if k != "$ref"}
        return {**target, **siblings}
    return {k: _resolve(v, defs) for k, v in node.items()}


def _without_null(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None` becomes plain X: an absent field means None, so `nullable` is never needed."""
    variants = node["anyOf"]
    kept = [v for v in variants if v.get("type") != "null"]
    if len(kept) != 1 or len(variants) != 2:
        raise ValueError(f"cannot express anyOf {variants!r} in a structural schema")
    # pydantic writes `default: null` for optional fields; an absent field needs no default.
    rest = {k: v for k, v in node.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**kept[0], **rest}


def _structural(node: dict[str, Any], path: str) -> dict[str, Any]:
    if "anyOf" in node:
        node = _without_null(node)
    if "oneOf" in node or "allOf" in node or "const" in node:
        raise ValueError(f"{path}: oneOf/allOf/const have no structural equivalent")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, f"{path}[]")
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _structural(value, f"{path}{{}}")
            # `false` is the server's default for known fields (it prunes the rest).
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        else:
            out[key] = value
    if "type" not in out:
        raise ValueError(f"{path}: every node of a structural schema needs a type")
    # `type` first, so the generated YAML reads like a hand-written schema.
    return {"type": out.pop("type"), **out}


def model_schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    """The structural openAPIV3Schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_resolve(raw, raw.get("$defs", {})), path)


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a plain dict."""
    schema = {
        "type": "object",
        "description": "A pool of LLM agent pods: scaled on queue depth, rotated, memory right-sized.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(models.AgentPoolSpec, "spec"),
            "status": model_schema(models.AgentPoolStatus, "status"),
        },
        "required": ["spec"],
    }
    column, text = {"type": "integer"}, {"type": "string"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": list(models.SHORT_NAMES),
                "categories": list(models.CATEGORIES),
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas.min",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Desired", "jsonPath": ".status.desiredReplicas", **column},
                        {"name": "Ready", "jsonPath": ".status.ready", **column},
                        {"name": "Warm", "jsonPath": ".status.warm", **column},
                        {"name": "Busy", "jsonPath": ".status.busy", **column},
                        {"name": "Queue", "jsonPath": ".status.queueDepth", **column},
                        {"name": "Memory", "jsonPath": ".status.memoryLimit", **text, "priority": 1},
                        {
                            "name": "Reason",
                            "jsonPath": ".status.lastDecisionReason",
                            **text,
                            "priority": 1,
                        },
                        {"name": "Age", "jsonPath": ".metadata.creationTimestamp", "type": "date"},
                    ],
                }
            ],
        },
    }


def render() -> str:
    """The YAML text of crds/agentpool.yaml."""
    header = "# Generated by `python -m tars_operator.crd` from tars_operator/models.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=CRD_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m tars_operator.crd", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
