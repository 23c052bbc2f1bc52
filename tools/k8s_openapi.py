"""Vendor Kubernetes' own OpenAPI definitions of the pod-level types the values carry.

    python tools/k8s_openapi.py   # starts the test tier's kube-apiserver, writes tools/k8s_pod_types.json

tolerations, affinity, volumes, volumeMounts and env are Kubernetes objects the chart copies
into every pod. trainer/values_codegen.py puts these definitions into values.schema.json, so a
typo (`operator: Equals`, `requiredDuringScheduling`) is refused by `kubetrain run/render/submit`
and by `helm install` alike, before any pod is created. The definitions come from the API
server's /openapi/v3/api/v1 document, trimmed to what validates (no descriptions or defaults)
and closed (`additionalProperties: false`: the API server drops or refuses unknown fields).
tests/cluster/test_pod_values_server.py checks that the committed file is what the server serves.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tools" / "k8s_pod_types.json"
ROOTS = ("Toleration", "Affinity", "Volume", "VolumeMount", "EnvVar")
PREFIX = "#/components/schemas/"
KEEP = ("type", "properties", "required", "items", "enum", "oneOf", "additionalProperties", "$ref")
# Enums whose empty value the API server accepts though the document leaves it out: a toleration's
# empty effect matches every effect, its empty operator means Equal.
EMPTY_ALLOWED = {("io.k8s.api.core.v1.Toleration", "effect"), ("io.k8s.api.core.v1.Toleration", "operator")}


def _trim(schema: dict) -> dict:
    """A definition as JSON Schema draft 7 validates it: refs to #/definitions, closed objects."""
    if list(schema.get("allOf") or []) and len(schema["allOf"]) == 1:  # the generator's `allOf: [$ref]`
        schema = {**schema, **schema["allOf"][0]}
    out: dict = {}
    for key in KEEP:
        if key not in schema:
            continue
        value = schema[key]
        if key == "$ref":
            return {"$ref": "#/definitions/" + value.removeprefix(PREFIX)}
        if key == "properties":
            value = {name: _trim(sub) for name, sub in sorted(value.items())}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = _trim(value)
        elif key == "oneOf":
            value = [_trim(sub) for sub in value]
        out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _refs(schema) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["$ref"].removeprefix("#/definitions/")} if "$ref" in schema else set()
        return found.union(*(_refs(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_refs(v) for v in schema))
    return set()


def pod_types(openapi: dict) -> dict:
    """The ROOTS and every definition they refer to, trimmed, from an /openapi/v3/api/v1 document."""
    schemas = openapi["components"]["schemas"]
    pending = [f"io.k8s.api.core.v1.{root}" for root in ROOTS]
    definitions: dict = {}
    while pending:
        name = pending.pop()
        if name not in definitions:
            definitions[name] = _trim(schemas[name])
            for owner, field in EMPTY_ALLOWED:
                if owner == name:
                    definitions[name]["properties"][field]["enum"].insert(0, "")
            pending += sorted(_refs(definitions[name]) - set(definitions))
    return dict(sorted(definitions.items()))


def document(openapi: dict, version: str) -> dict:
    return {"kubernetes": version, "source": "kube-apiserver /openapi/v3/api/v1 (python tools/k8s_openapi.py)",
            "definitions": pod_types(openapi)}


def main() -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from kube_control_plane import apiserver_on_loopback

    with tempfile.TemporaryDirectory() as work, apiserver_on_loopback(Path(work), crds=False) as cluster:
        openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v3/api/v1").stdout)
        version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)["gitVersion"]
    OUT.write_text(json.dumps(document(openapi, version), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)} (Kubernetes {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
