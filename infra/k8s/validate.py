"""Validate the Kubernetes manifests offline, before ``kubectl apply``.

Built-in kinds (PersistentVolumeClaim, ConfigMap, ...) go through ``kubernetes-validate`` (the API server's
OpenAPI schemas, strict: unknown fields fail). The Kubeflow ``PyTorchJob`` is checked with ``jsonschema``
against a schema built from the training operator's published OpenAPI models (the ``kubeflow-training`` SDK,
generated from the CRD's spec): every Kubeflow object with its field types and no unknown fields, and every
embedded Kubernetes type (the pod templates, ObjectMeta, autoscaling metrics) by reference into the same
strict Kubernetes schemas, so a typo in a container field fails here too.

    python infra/k8s/validate.py infra/k8s/*.yaml
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.33.0"  # the API version the manifests target (kubernetes-validate ships 1.25-1.37)
KUBEFLOW_KINDS = {("kubeflow.org/v1", "PyTorchJob"): "KubeflowOrgV1PyTorchJob"}


@cache
def kubernetes_definitions() -> dict[str, Any]:
    """The strict Kubernetes OpenAPI definitions bundled with kubernetes-validate."""
    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return json.loads((folder / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json").read_text())["$defs"]


def _kubernetes_ref(model: str) -> str:
    """``V1PodTemplateSpec`` / ``K8sIoApiAutoscalingV2MetricSpec`` / ``Quantity`` -> its key in
    :func:`kubernetes_definitions`."""
    grouped = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d\w*?)([A-Z]\w*)", model)
    versioned = re.fullmatch(r"(V\d\w*?)([A-Z]\w*)", model)
    if grouped:
        group, version, kind = grouped.groups()
        suffix = f".{group.lower()}.{version.lower()}.{kind}"
    elif versioned:
        version, kind = versioned.groups()
        suffix = f".{version.lower()}.{kind}"
    else:  # unversioned (Quantity)
        suffix = f".{model}"
    keys = [k for k in kubernetes_definitions() if k.endswith(suffix)]
    core = [k for k in keys if k.startswith(("io.k8s.api.core.", "io.k8s.apimachinery."))]
    if not keys:
        raise KeyError(f"no Kubernetes definition for {model} (*{suffix})")
    return (core or keys)[0]


def _type_schema(spec: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of one swagger-codegen type string (``int``, ``list[X]``, ``dict(str, X)``, a model name)."""
    if spec in ("str", "datetime"):
        return {"type": "string"}
    if spec == "int":
        return {"type": "integer"}
    if spec == "float":
        return {"type": "number"}
    if spec == "bool":
        return {"type": "boolean"}
    if spec == "object":
        return {}
    if spec.startswith("list["):
        return {"type": "array", "items": _type_schema(spec[5:-1], definitions)}
    if spec.startswith("dict("):
        return {"type": "object", "additionalProperties": _type_schema(spec[5:-1].split(", ", 1)[1], definitions)}
    if spec.startswith("KubeflowOrg"):
        _model_schema(spec, definitions)
        return {"$ref": f"#/$defs/{spec}"}
    return {"$ref": f"#/$defs/{_kubernetes_ref(spec)}"}


def _model_schema(name: str, definitions: dict[str, Any]) -> None:
    """Add the schema of the Kubeflow SDK model ``name`` (and every model it uses) to ``definitions``."""
    if name in definitions:
        return
    from kubeflow.training import models

    model = getattr(models, name)
    definitions[name] = {}  # placeholder: models may refer to themselves
    properties = {model.attribute_map[a]: _type_schema(t, definitions) for a, t in model.openapi_types.items()}
    definitions[name] = {"type": "object", "properties": properties, "additionalProperties": False}


@cache
def kubeflow_schema(api_version: str, kind: str) -> dict[str, Any]:
    definitions: dict[str, Any] = dict(kubernetes_definitions())
    name = KUBEFLOW_KINDS[(api_version, kind)]
    _model_schema(name, definitions)
    return {
        "allOf": [
            {"$ref": f"#/$defs/{name}"},
            {
                "required": ["apiVersion", "kind", "metadata", "spec"],
                "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}},
            },
        ],
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": definitions,
    }


def validate_document(doc: dict[str, Any]) -> None:
    """Raise (``jsonschema.ValidationError`` / ``kubernetes_validate.ValidationError``) if ``doc`` is invalid."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in KUBEFLOW_KINDS:
        import jsonschema

        jsonschema.validate(doc, kubeflow_schema(*key))  # type: ignore[arg-type]
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def validate_file(path: Path) -> int:
    """Validate every document of a manifest file; the number checked."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        validate_document(doc)
    return len(docs)


def main(argv: list[str]) -> int:
    failed = 0
    for arg in argv:
        try:
            print(f"{arg}: {validate_file(Path(arg))} documents valid")
        except Exception as exc:  # report every file, then fail
            failed += 1
            print(f"{arg}: INVALID: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
