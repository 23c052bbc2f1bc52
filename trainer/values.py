"""Values: the same inputs `helm template -f ... --set ...` takes, merged as Helm merges them.

Helm first builds the user's values: the `-f` files merged in order (maps key by
key, anything else replaced, a null included), then every `--set-json`, `--set`
and `--set-string` parsed *into* that map (so `--set list[1].x=y` edits a list a
file gave). Only then are they coalesced onto the chart defaults, where a null
removes the default (pkg/cli/values/options.go, pkg/strvals, pkg/chartutil/coalesce.go).
The result is validated against the chart's values.schema.json; every violation is
reported with its key path.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from trainer.chart import SafeLoader, default_values, values_schema
from trainer.errors import UserError


# ---------------------------------------------------------------- merging
def merge_user_values(base: dict, override: dict) -> dict:
    """Helm's mergeMaps for `-f` files: maps merge key by key; anything else, null too, replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_user_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge(defaults: dict, user: dict) -> dict:
    """Helm's coalescing of user values onto defaults: the user's value wins, maps merge, and a null
    removes the default it meets (a null for a key without a default stays, as in Helm)."""
    out = copy.deepcopy(user)
    _coalesce(out, defaults)
    return out


def _coalesce(dst: dict, src: dict) -> None:
    for key, default in src.items():
        if key not in dst:
            dst[key] = copy.deepcopy(default)
        elif dst[key] is None:
            del dst[key]
        elif isinstance(default, dict) and isinstance(dst[key], dict):
            _coalesce(dst[key], default)


MAX_EXPANDED_NODES = 1_000_000  # far above any values file; an alias "bomb" of 10 x 10 x ... lists is far above it
# The chart's values nest 5 levels; Python's merge and schema check recurse, so a value nested a few
# hundred levels deep would end in a RecursionError traceback rather than a message.
MAX_DEPTH = 100


class ExcessiveAliasing(yaml.YAMLError):
    problem = (f"document contains excessive aliasing: its aliases expand to more than {MAX_EXPANDED_NODES} "
               "values (helm refuses it too)")


class TooDeep(yaml.YAMLError):
    problem = f"maps and lists nest more than {MAX_DEPTH} levels deep"


def too_deep(value: Any) -> bool:
    """Whether a loaded value (a --set-json one) nests maps and lists deeper than MAX_DEPTH; iterative."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return False


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is copied out, as merging copies them; stops
    counting past the bound (and at an alias inside its own anchor). Iterative: deep nesting is fine."""
    def children(node: yaml.Node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return node.value if isinstance(node, yaml.SequenceNode) else []

    sizes: dict[int, int] = {}
    active, stack = {id(root)}, [(root, iter(children(root)))]
    while stack:
        node, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            active.discard(id(node))
            sizes[id(node)] = min(MAX_EXPANDED_NODES + 1, 1 + sum(sizes[id(c)] for c in children(node)))
        elif id(child) in active:
            return MAX_EXPANDED_NODES + 1  # a structure that contains itself never ends when copied
        elif id(child) not in sizes:
            if len(stack) > MAX_DEPTH:
                raise TooDeep()
            active.add(id(child))
            stack.append((child, iter(children(child))))
    return sizes[id(root)]


class HelmValuesLoader(SafeLoader):
    """YAML scalars typed as Helm types them (go-yaml v2): `y`/`n` are booleans and `1e3`
    a float; dates, `1:30` and `=` stay strings: `kubetrain run` reads values as helm does."""

    def construct_document(self, node):
        if _expanded_size(node) > MAX_EXPANDED_NODES:
            raise ExcessiveAliasing()
        return super().construct_document(node)


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
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): save the "
                        "values file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read values file: {e.strerror}") from None
    try:
        data = _string_keys(yaml.load(text, Loader=HelmValuesLoader))
    except RecursionError:  # composing nodes recurses before TooDeep can count them
        raise UserError(f"{path}: not valid YAML: {TooDeep.problem}") from None
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
    if raw and raw[0] != "0" and re.fullmatch(r"[+-]?\d{1,19}", raw):  # 19 digits: int() refuses 4300+
        value = int(raw)
        if -(2**63) <= value < 2**63:
            return value
    return raw


_PATH_PART = re.compile(r"((?:[^.\[\\]|\\.)+)((?:\[\d+\])*)")
# Helm's strvals bounds (MaxIndex, MaxNestedNameLevel): `list[99999999]=x` would otherwise fill a list
# with 10^8 nulls (gigabytes, minutes) before any check sees it; helm refuses it at once.
MAX_INDEX = 65536
MAX_NESTED_NAME_LEVEL = 30


def _parse_key(key: str, expr: str, flag: str = "--set") -> list[str | int]:
    path: list[str | int] = []
    segments = _split_unescaped(key, ".")
    if len(segments) - 1 > MAX_NESTED_NAME_LEVEL:
        raise UserError(f"{flag} {expr}: {key} is nested {len(segments) - 1} levels deep, more than the maximum "
                        f"supported nested level of {MAX_NESTED_NAME_LEVEL}, as in helm")
    for segment in segments:
        m = _PATH_PART.fullmatch(segment)
        if not m:
            raise UserError(f"{flag} {expr}: cannot parse key {key!r}")
        path.append(_unescape(m.group(1)))
        for index in re.findall(r"\[(\d+)\]", m.group(2)):
            digits = index.lstrip("0") or "0"  # a length test first: int() refuses 4300+ digits
            if len(digits) > len(str(MAX_INDEX)) or int(digits) > MAX_INDEX:
                raise UserError(f"{flag} {expr}: the index {digits[:20]}{'...' if len(digits) > 20 else ''} "
                                f"in {key} is greater than the maximum supported index of {MAX_INDEX}, as in helm")
            path.append(int(digits))
    return path


def _describe(value: Any) -> str:
    return "null" if value is None else f"a {_TYPE_NAMES.get(type(value), type(value).__name__)} ({value!r})"


_TYPE_NAMES = {dict: "map", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def _assign(target: dict, path: list[str | int], value: Any, flag: str, expr: str) -> None:
    """Set path to value inside target as Helm's strvals parser does: it descends into the maps and
    lists already there (from files or earlier flags), and refuses to descend into anything else."""
    node: Any = target
    for depth, (here, nxt) in enumerate(zip(path, path[1:])):
        where = _dotted(path[:depth + 1])
        if isinstance(here, int):
            while len(node) <= here:
                node.append(None)
            if isinstance(nxt, str) and not isinstance(node[here], dict):
                node[here] = {}  # Helm starts a fresh map over whatever was at that index
            elif isinstance(nxt, int) and node[here] is None:
                node[here] = []
            elif isinstance(nxt, int) and not isinstance(node[here], list):
                raise UserError(f"{flag} {expr}: {where} is {_describe(node[here])}, not a list")
        else:
            empty: Any = [] if isinstance(nxt, int) else {}
            if here not in node:
                node[here] = empty
            elif not isinstance(node[here], type(empty)):
                raise UserError(f"{flag} {expr}: {where} is {_describe(node[here])} (from a values file or an "
                                f"earlier flag), not a {'list' if isinstance(nxt, int) else 'map'}: "
                                f"set it to null in one place or give the whole {where} in one value")
        node = node[here]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _dotted(path: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


_FLAGS = {"set": "--set", "string": "--set-string", "json": "--set-json"}


def parse_set(expressions: Iterable[str], mode: str = "set", into: dict | None = None) -> dict:
    """Parse `--set` style expressions into `into` (a new map by default), Helm's strvals rules.

    mode: "set" types values like Helm, "string" keeps strings, "json" parses JSON.
    """
    out: dict = {} if into is None else into
    flag = _FLAGS[mode]
    for expr in expressions:
        for key, value in _pairs(expr, mode, flag):
            _assign(out, _parse_key(key, expr, flag), value, flag, expr)
    return out


def _pairs(expr: str, mode: str, flag: str) -> Iterable[tuple[str, Any]]:
    if mode == "json":  # key=JSON[,key=JSON...]: each value is as long as its JSON is
        rest = expr
        while rest:
            key, sep, rest = rest.partition("=")
            if not sep or not key:
                raise UserError(f"{flag} {expr}: expected key=value")
            if not rest.strip() or rest.lstrip().startswith(","):
                yield key, None
                rest = rest.lstrip().removeprefix(",")
                continue
            try:
                value, end = json.JSONDecoder().raw_decode(rest.lstrip())
            except json.JSONDecodeError as e:
                raise UserError(f"{flag} {expr}: the value of {key} is not JSON: {e.msg}") from None
            except RecursionError:  # the decoder's own: far deeper than allowed
                value, end = None, -1
            if end < 0 or too_deep(value):
                raise UserError(f"{flag} {key}=...: the value of {key} nests maps and lists more than "
                                f"{MAX_DEPTH} levels deep")
            yield key, value
            rest = rest.lstrip()[end:].lstrip()
            if rest and not rest.startswith(","):
                raise UserError(f"{flag} {expr}: unexpected {rest!r} after the JSON value of {key}")
            rest = rest.removeprefix(",")
        return
    for pair in _split_unescaped(expr, ","):
        if not pair:
            continue
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {expr}: expected key=value")
        if raw.startswith("{") and raw.endswith("}"):
            items = _split_unescaped(raw[1:-1], ",") if raw[1:-1] else []
            yield key, [_unescape(x) if mode == "string" else typed_value(_unescape(x)) for x in items]
        else:
            yield key, _unescape(raw) if mode == "string" else typed_value(_unescape(raw))


# ---------------------------------------------------------------- validation
def key_path(error: jsonschema.ValidationError) -> str:
    """A violation's location as Helm prints it: dotted, `(root)` at the top."""
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(root)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "required" and error.validator_value and "then" not in error.schema_path:
        missing = sorted(set(error.validator_value) - set(error.instance))
        return "; ".join(f"{name} is missing: a null removes a whole section or key, the chart's defaults "
                         "included; set the keys you mean instead" for name in missing)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return "; ".join(f"Additional property {name} is not allowed" for name in extra)
    if "then" in error.schema_path and error.schema.get("description"):  # a task's rule: say which and why
        return f"{error.instance!r} is not valid: {error.schema['description']}"
    if error.validator in ("pattern", "not", "const") and error.schema.get("errorMessage"):
        return f"{error.instance!r} is not valid: {error.schema['errorMessage']}"  # a regex says nothing to a user
    if error.validator == "oneOf":
        return f"{error.instance!r} is not valid: {error.schema.get('errorMessage', 'no alternative matched')}"
    if error.validator == "type" and "integer" in error.validator_value and _is_fraction(error.instance):
        low = math.floor(float(error.instance))
        return (f"{error.instance!r} is not a whole number: this key takes an integer, "
                f"e.g. {low} or {low + 1}")
    if error.validator == "type" and "integer" in error.validator_value and _beyond_int64(error.instance):
        # --set kept it a string because it overflows; "use --set KEY=N" would repeat what just failed.
        side = "up to 9223372036854775807" if not error.instance.startswith("-") else "down to -9223372036854775808"
        digits = len(error.instance)
        shown = error.instance if digits <= 30 else f"{error.instance[:20]}... ({digits} digits)"
        return (f"{shown} is out of range: --set reads whole numbers {side} (64-bit, as helm does), "
                f"and this key takes {_integer_range(error.schema)}")
    if error.validator == "type" and "integer" in error.validator_value and _is_decimal_text(error.instance):
        return (f"{error.instance!r} is a string, not an integer: --set-string and quotes keep text; "
                f"use --set {key_path(error)}={error.instance} or an unquoted number in a values file")
    if error.validator == "type" and "number" in error.validator_value and _is_decimal_text(error.instance):
        # Helm's --set keeps 0.01 a string; say how to pass a number instead of only "wrong type".
        return (f"{error.message} (--set keeps decimals as strings, as Helm does: "
                f"use --set-json or a values file)")
    return error.message


def _is_fraction(value) -> bool:
    """A number with a fractional part, or text that reads as one (`--set` keeps 2.5 a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and not number.is_integer()


def _beyond_int64(value) -> bool:
    if not isinstance(value, str) or not re.fullmatch(r"[+-]?[0-9]+", value):
        return False
    return len(value.lstrip("+-")) > 19 or not -(2**63) <= int(value) < 2**63


def _integer_range(schema: dict) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"a whole number from {low} to {high}"
    if low is not None:
        return f"a whole number of at least {low}"
    return "a whole number" if high is None else f"a whole number of at most {high}"


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
    """What the chart sees: the user's files, then --set-json, --set and --set-string parsed into them
    (Helm's order, pkg/cli/values/options.go MergeValues), coalesced onto the defaults, validated."""
    user: dict = {}
    for path in files:
        user = merge_user_values(user, load_values_file(path))
    for exprs, mode in ((set_json, "json"), (set_values, "set"), (set_string, "string")):
        parse_set(exprs, mode, into=user)
    return validate(merge(default_values(), user))


def _absolute_data_paths(values: dict) -> dict:
    """A local run's replicas start in its workdir: a relative training.data.path or evalPath (a file,
    not a URI or dataset name) means the directory the user ran kubetrain in."""
    data = values["training"]["data"]
    resolved = {key: str(Path(data[key]).resolve()) for key in ("path", "evalPath")
                if data.get(key) and "://" not in data[key] and not Path(data[key]).is_absolute()
                and Path(data[key]).exists()}
    if not resolved:
        return values
    return {**values, "training": {**values["training"], "data": {**data, **resolved}}}


def resolve_python_path(values: dict, files: Iterable[str | Path] = (), set_exprs: Iterable[str] = ()) -> dict:
    """For a local run: relative `training.pythonPath` entries resolved against the directory of the
    values file that set them (the current directory when --set did), as a user writing `["."]` next
    to their code means. A pod resolves them against the container's working directory instead."""
    values = _absolute_data_paths(values)
    entries = values["training"]["pythonPath"]
    if all(Path(e).is_absolute() for e in entries):
        return values
    base, origin = Path.cwd(), "the current directory"
    for path in files:
        if "pythonPath" in (load_values_file(path).get("training") or {}):
            base, origin = Path(path).resolve().parent, f"values file {path}"
    if any("training.pythonPath" in expr for expr in set_exprs):
        base, origin = Path.cwd(), "the current directory (--set)"
    resolved = []
    for entry in entries:
        absolute = (base / entry).resolve()
        if not absolute.is_dir():
            raise UserError(f"training.pythonPath: {entry!r} is relative to {origin}, and {absolute} is not a directory")
        resolved.append(str(absolute))
    return {**values, "training": {**values["training"], "pythonPath": resolved}}
