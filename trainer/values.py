"""Values: the same inputs `helm template -f ... --set ...` takes.

Precedence (lowest first): chart defaults, each `-f` file in order, each
`--set`/`--set-string`/`--set-json` in order. Maps merge key by key, lists are
replaced whole, and a null removes a key, as in Helm. The merged values are
validated against the chart's values.schema.json; every violation is reported
with its key path.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from trainer.chart import default_values, values_schema
from trainer.errors import UserError


# ---------------------------------------------------------------- merging
def merge(base: dict, override: dict) -> dict:
    """Helm's coalescing: override wins, maps merge, null deletes."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class HelmValuesLoader(yaml.SafeLoader):
    """YAML scalars typed as Helm types them (go-yaml v2): `y`/`n` are booleans and `1e3`
    a float; dates, `1:30` and `=` stay strings. Keeps render and helm template in step."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_GO_DIFFERS = {_INT, _FLOAT, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}
HelmValuesLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _GO_DIFFERS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
HelmValuesLoader.bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}
HelmValuesLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
HelmValuesLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0b[01_]+|0[0-7_]+)$"), list("-+0123456789"))
HelmValuesLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _string_keys(node: Any) -> Any:
    """Mapping keys as strings, as Helm's YAML-to-JSON step makes them (`n:` becomes "false")."""
    if isinstance(node, dict):
        return {(json.dumps(k) if isinstance(k, bool) or k is None else str(k)) if not isinstance(k, str) else k:
                _string_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_string_keys(v) for v in node]
    return node


def load_values_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: values file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read values file: {e.strerror}") from None
    try:
        data = _string_keys(yaml.load(text, Loader=HelmValuesLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: values must be a YAML mapping, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- --set
def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on `sep` outside `{...}` lists, honouring backslash escapes."""
    parts, buf, depth, i = [], [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def typed_value(raw: str) -> Any:
    """Helm's strvals typing: true/false/null, base-10 integers; all else is a string."""
    if raw.lower() == "true":
        return True
    if raw.lower() == "false":
        return False
    if raw.lower() == "null":
        return None
    if raw == "0":
        return 0
    if raw and raw[0] != "0" and re.fullmatch(r"[+-]?\d+", raw):
        value = int(raw)
        if -(2**63) <= value < 2**63:
            return value
    return raw


_PATH_PART = re.compile(r"((?:[^.\[\\]|\\.)+)((?:\[\d+\])*)")


def _parse_key(key: str, expr: str) -> list[str | int]:
    path: list[str | int] = []
    for segment in _split_unescaped(key, "."):
        m = _PATH_PART.fullmatch(segment)
        if not m:
            raise UserError(f"--set {expr}: cannot parse key {key!r}")
        path.append(_unescape(m.group(1)))
        path.extend(int(ix) for ix in re.findall(r"\[(\d+)\]", m.group(2)))
    return path


def _assign(target: dict, path: list[str | int], value: Any, expr: str) -> None:
    node: Any = target
    for here, nxt in zip(path, path[1:]):
        empty = [] if isinstance(nxt, int) else {}
        if isinstance(here, int):
            if not isinstance(node, list):
                raise UserError(f"--set {expr}: {here} indexes a non-list")
            while len(node) <= here:
                node.append(None)
            if not isinstance(node[here], (dict, list)):
                node[here] = empty
            node = node[here]
        else:
            if not isinstance(node.get(here), (dict, list)):
                node[here] = empty
            node = node[here]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list):
            raise UserError(f"--set {expr}: {last} indexes a non-list")
        while len(node) <= last:
            node.append(None)
        node[last] = value
    else:
        node[last] = value


def parse_set(expressions: Iterable[str], mode: str = "set") -> dict:
    """Parse `--set` style expressions into a values override (Helm's strvals rules).

    mode: "set" types values like Helm, "string" keeps strings, "json" parses JSON.
    """
    out: dict = {}
    for expr in expressions:
        pairs = [expr] if mode == "json" else _split_unescaped(expr, ",")
        for pair in pairs:
            if not pair:
                continue
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise UserError(f"--set {expr}: expected key=value")
            if mode == "json":
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise UserError(f"--set-json {expr}: value is not JSON: {e.msg}") from None
            elif raw.startswith("{") and raw.endswith("}"):
                items = _split_unescaped(raw[1:-1], ",") if raw[1:-1] else []
                value = [_unescape(x) if mode == "string" else typed_value(_unescape(x)) for x in items]
            else:
                value = _unescape(raw) if mode == "string" else typed_value(_unescape(raw))
            _assign(out, _parse_key(key, expr), value, expr)
    return out


# ---------------------------------------------------------------- validation
def key_path(error: jsonschema.ValidationError) -> str:
    """A violation's location as Helm prints it: dotted, `(root)` at the top."""
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(root)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return "; ".join(f"Additional property {name} is not allowed" for name in extra)
    if error.validator == "pattern" and error.schema.get("description"):  # a regex says nothing to a user
        return f"{error.instance!r} is not valid: {error.schema['description']}"
    if error.validator == "oneOf":
        return f"{error.instance!r} is not valid: {error.schema.get('description', 'no alternative matched')}"
    if error.validator == "type" and "number" in error.validator_value and _is_decimal_text(error.instance):
        # Helm's --set keeps 0.01 a string; say how to pass a number instead of only "wrong type".
        return (f"{error.message} (--set keeps decimals as strings, as Helm does: "
                f"use --set-json or a values file)")
    return error.message


def _is_decimal_text(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def schema_violations(values: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(values_schema())
    errors = sorted(validator.iter_errors(values), key=lambda e: (key_path(e), e.message))
    return [f"{key_path(e)}: {_message(e)}" for e in errors]


def validate(values: dict, source: str = "values") -> dict:
    problems = schema_violations(values)
    if problems:
        raise UserError(f"{source} do not match the chart's schema:\n- " + "\n- ".join(problems))
    return values


def resolve_values(
    files: Iterable[str | Path] = (),
    set_values: Iterable[str] = (),
    set_string: Iterable[str] = (),
    set_json: Iterable[str] = (),
) -> dict:
    """Chart defaults < files < --set-json < --set < --set-string, merged and validated: what the
    chart sees. The order is Helm's (pkg/cli/values/options.go, MergeValues)."""
    values = copy.deepcopy(default_values())
    for path in files:
        values = merge(values, load_values_file(path))
    for exprs, mode in ((set_json, "json"), (set_values, "set"), (set_string, "string")):
        values = merge(values, parse_set(exprs, mode))
    return validate(values)
