"""Write the chart's values.yaml and values.schema.json from trainer/values_model.py.

    python -m trainer.values_codegen           # rewrite both files in helm/kubetrain/
    python -m trainer.values_codegen --check   # exit 1 naming the first key that differs

Both files are generated: edit the model, then run this. The CLI reads the
committed files (no import of the model on its start-up path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from trainer import values_model
from trainer.values_model import key_name
from trainer.values import HelmValuesLoader

CHART = Path(__file__).resolve().parent.parent / "helm" / "kubetrain"
# Kubernetes' definitions of the pod-level types (tools/k8s_openapi.py vendors them from the API server).
K8S_TYPES = Path(__file__).resolve().parent.parent / "tools" / "k8s_pod_types.json"
HEADER = """\
# Default values for kubetrain: one Helm release is one experiment, and the
# release name is the experiment (and PyTorchJob) name.
# `kubetrain render|run|submit` take exactly these values; values.schema.json
# validates them in both paths.
# Generated from trainer/values_model.py by `python -m trainer.values_codegen`: edit the model, not this file.
"""
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", type(None): "null"}


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls, vars(values_model))
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def default_of(field: dataclasses.Field) -> Any:
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return as_plain(value)


def as_plain(value: Any) -> Any:
    """A setting's default as YAML/JSON holds it: tuples as lists (sections are walked, not converted)."""
    if isinstance(value, (tuple, list)):
        return [as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------ the schema
def _type_schema(hint: Any) -> dict:
    if get_origin(hint) in (Union, types.UnionType):
        return {"type": [JSON_TYPES[arg] for arg in get_args(hint)]}
    if get_origin(hint) is tuple:
        return {"type": "array"}
    return {"type": JSON_TYPES[hint]}


def object_schema(cls: type, path: str) -> dict:
    schema: dict = {"type": "object"}
    if not getattr(cls, "open_object", False):
        schema["additionalProperties"] = False
    schema["properties"] = {}
    required = []
    for field, hint in fields_of(cls):
        key = f"{path}.{key_name(field)}" if path else key_name(field)
        schema["properties"][key_name(field)] = field_schema(field, hint, key)
        if key in REQUIRED_KEYS:
            required.append(key_name(field))  # `--set checkpoint=null` deletes a section: say so, by name
    if required:
        schema["required"] = required
    return schema


# What nothing can run or render without: a null that deletes one is refused by name. (Other sections,
# podSecurityContext say, may be removed with a null, as Helm allows.)
REQUIRED_KEYS = {"job", "training", "checkpoint", "s3", "metrics", "training.task"}


def field_schema(field: dataclasses.Field, hint: Any, key: str) -> dict:
    meta = field.metadata
    if dataclasses.is_dataclass(hint):
        schema = object_schema(hint, key)
    else:
        extra = meta["schema"]
        schema = {} if "oneOf" in extra else _type_schema(hint)
        schema.update(extra)
    schema["description"] = f"{key} {meta['doc']}"
    if meta["invalid"]:
        schema["errorMessage"] = meta["invalid"]
    return schema


def _source_rule(source: str, then: dict) -> dict:
    return {"if": {"properties": {"data": {"required": ["source"], "properties": {"source": {"const": source}}}}},
            "then": {"properties": then}}


def _words(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def task_rules() -> list[dict]:
    """Per task: the data sources it reads, the default head size, and what a source needs."""
    rules = []
    for task, rule in values_model.TASK_RULES.items():
        then: dict = {"properties": {}}
        if task == "custom":
            then["properties"] = {
                "entrypoint": {"minLength": 1, "description":
                               'training.task custom needs training.entrypoint: "package.module:function"'},
                "pretrained": {"not": {"const": True}, "description": "training.task custom takes "
                               "training.pretrained as a weights URI (file:// or s3://) or false"},
            }
        if rule.num_classes is not None:
            then["properties"]["numClasses"] = {"default": rule.num_classes}
        else:  # no classifier head: a folder of weights names everything
            then["properties"]["pretrained"] = {"type": "string", "description": (
                f"training.task {task} needs training.pretrained: a save_pretrained folder (file://, s3:// or "
                "hf://org/name)")}
        if rule.options is not None:
            then["properties"]["options"] = rule.options
        if not rule.language_model:
            then["properties"]["finetune"] = {"properties": {"method": {"const": "full", "description": (
                f"training.finetune.method lora and qlora are for training.task causal-lm; {task} trains full")}}}
            then["properties"]["activationCheckpointing"] = {"const": False, "description": (
                "training.activationCheckpointing is for training.task causal-lm")}
        if rule.sources:
            then["properties"]["data"] = {"properties": {"source": {
                "enum": list(rule.sources), "description": f"{task} reads {_words(rule.sources)} data"}}}
        fixed = dict(rule.fixed_classes)
        nested = []
        for source in rule.sources:
            if source in fixed:
                n = fixed[source]
                nested.append(_source_rule(source, {"numClasses": {"enum": [None, n], "description": (
                    f"{task} on {source} data has {n} classes: leave training.numClasses null or set {n}")}}))
            if source in rule.needs_path:
                nested.append(_source_rule(source, {"data": {"properties": {"path": {"minLength": 1, "description": (
                    f"{task} reads training.data.source {source} from training.data.path: set it")}}}}))
        if nested:
            then["allOf"] = nested
        rules.append({"if": {"required": ["task"], "properties": {"task": {"const": task}}}, "then": then})
    return rules


def k8s_types() -> dict:
    return json.loads(K8S_TYPES.read_text(encoding="utf-8"))


def _exactly_one(node: Any, definitions: dict) -> Any:
    """`exactlyOneOf: Kind` -> a oneOf requiring one of that definition's properties (but `name`): a volume's
    sources, an env var's valueFrom sources, as many as the vendored Kubernetes version has."""
    if isinstance(node, list):
        return [_exactly_one(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "exactlyOneOf":
            names = definitions[f"io.k8s.api.core.v1.{value}"]["properties"]
            out["oneOf"] = [{"required": [name]} for name in names if name != "name"]
        else:
            out[key] = _exactly_one(value, definitions)
    return out


def values_schema() -> dict:
    root = object_schema(values_model.Values, "")
    root["properties"] = {"global": {"type": "object", "description": "global is Helm's global values (unused)."},
                          **root["properties"]}
    root["properties"]["training"]["allOf"] = task_rules()
    vendored = k8s_types()
    root = _exactly_one(root, vendored["definitions"])
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "kubetrain values", **root,
            "definitions": vendored["definitions"],
            "$comment": f"definitions: Kubernetes {vendored['kubernetes']}'s OpenAPI types (tools/k8s_pod_types.json)"}


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------ values.yaml
def _scalar(value: Any) -> str:
    if isinstance(value, str):
        plain = yaml.dump(value, default_style=None, width=10_000).removesuffix("\n...\n").rstrip("\n")
        read_back = yaml.load(value, Loader=HelmValuesLoader) if value else None
        return value if plain == value and read_back == value else json.dumps(value)
    return json.dumps(value)  # null, true/false, numbers as YAML and JSON both write them


def _yaml_lines(cls: type, path: str, indent: int) -> list[str]:
    lines = []
    pad = " " * indent
    for field, hint in fields_of(cls):
        key = key_name(field)
        dotted = f"{path}.{key}" if path else key
        if not path and lines:
            lines.append("")
        lines.append(f"{pad}# {dotted} {field.metadata['doc']}")
        if dataclasses.is_dataclass(hint):
            lines.append(f"{pad}{key}:")
            lines += _yaml_lines(hint, dotted, indent + 2)
            continue
        value = default_of(field)
        if isinstance(value, list) and value:
            lines.append(f"{pad}{key}:")
            lines += [f"{pad}  - {_scalar(item)}" for item in value]
        elif isinstance(value, dict) and value:
            raise ValueError(f"{dotted}: a non-empty mapping default needs its own class in the model")
        else:
            lines.append(f"{pad}{key}: {'[]' if value == [] else '{}' if value == {} else _scalar(value)}")
    return lines


def values_yaml_text() -> str:
    return HEADER + "\n" + "\n".join(_yaml_lines(values_model.Values, "", 0)) + "\n"


# ------------------------------------------------------------------ comparing
def _yaml_key_at(lines: list[str], index: int) -> str:
    """The dotted key that line `index` of a values.yaml belongs to (its own key or the one below its comment)."""
    stack: list[str] = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):", line)
        if match:
            stack = stack[:len(match.group(1)) // 2] + [match.group(2)]
            if number >= index:
                return ".".join(stack)
    return ".".join(stack) or "(end of file)"


def first_yaml_difference(committed: str, generated: str) -> Optional[str]:
    ours, theirs = generated.splitlines(), committed.splitlines()
    for index in range(max(len(ours), len(theirs))):
        mine = ours[index] if index < len(ours) else None
        other = theirs[index] if index < len(theirs) else None
        if mine != other:
            return (f"values.yaml differs first at key {_yaml_key_at(ours, index)} (line {index + 1}): "
                    f"committed {other!r}, generated {mine!r}")
    return None


def _schema_key(path: list[str]) -> str:
    """JSON path in the schema -> the values key it describes, e.g. training.epochs (minimum)."""
    keys, rest = [], []
    for i, part in enumerate(path):
        if i and path[i - 1] == "properties" and not rest:
            keys.append(part)
        elif part != "properties" or rest:
            rest.append(part)
    return (".".join(keys) or "(root)") + (f" ({'.'.join(rest)})" if rest else "")


def first_schema_difference(committed: Any, generated: Any, path: Optional[list[str]] = None) -> Optional[str]:
    path = path or []
    if isinstance(generated, dict) and isinstance(committed, dict):
        for key in list(generated) + [k for k in committed if k not in generated]:
            if key not in committed or key not in generated:
                where = "generated only" if key in generated else "committed only"
                return f"values.schema.json differs first at key {_schema_key(path + [key])}: {where}"
            found = first_schema_difference(committed[key], generated[key], path + [key])
            if found:
                return found
        if list(committed) != list(generated):
            return f"values.schema.json differs first at key {_schema_key(path)}: key order"
        return None
    if isinstance(generated, list) and isinstance(committed, list) and len(generated) == len(committed):
        for i, (a, b) in enumerate(zip(committed, generated)):
            found = first_schema_difference(a, b, path + [str(i)])
            if found:
                return found
        return None
    if committed != generated or type(committed) is not type(generated):
        return (f"values.schema.json differs first at key {_schema_key(path)}: committed "
                f"{json.dumps(committed)}, generated {json.dumps(generated)}")
    return None


def differences(chart: Optional[Path] = None) -> list[str]:
    """What differs between the committed files and the model's output (empty when they agree)."""
    chart, found = chart or CHART, []
    yaml_path, schema_path = chart / "values.yaml", chart / "values.schema.json"
    yaml_diff = first_yaml_difference(yaml_path.read_text(encoding="utf-8"), values_yaml_text())
    if yaml_diff:
        found.append(yaml_diff)
    committed_schema = schema_path.read_text(encoding="utf-8")
    if committed_schema != schema_text():
        found.append(first_schema_difference(json.loads(committed_schema), values_schema())
                     or "values.schema.json differs in its formatting only")
    return found


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.values_codegen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.check:
        found = differences()
        for line in found:
            print(line, file=sys.stderr)
        if found:
            print("run `python -m trainer.values_codegen` and commit the result", file=sys.stderr)
        return 1 if found else 0
    (CHART / "values.yaml").write_text(values_yaml_text(), encoding="utf-8")
    (CHART / "values.schema.json").write_text(schema_text(), encoding="utf-8")
    print(f"wrote {CHART / 'values.yaml'} and {CHART / 'values.schema.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
