"""The Helm template functions the chart uses, with the bytes Go prints.

`kubetrain render` must print what `helm template` prints, byte for byte, so the
functions the templates call are reproduced here from their Go sources (Helm 3,
sprig, sigs.k8s.io/yaml and its go-yaml v2 fork, encoding/json, strconv):

- `quote`      fmt's %q: strconv.Quote.
- `printf`     fmt.Sprintf for the verbs the chart's messages use: %q, %d, %s.
- `toJson`     encoding/json, HTML-escaping and float formatting included.
- `toPrettyJson`  the same, indented by two spaces.
- `toYaml`     sigs.k8s.io/yaml: JSON first (so 1.0 becomes 1), then go-yaml v2's
               encoder: its key order, its quoting rules, its 80-column folding.
- `indent`/`nindent`  sprig's.

The YAML emitter below is a port of the block-style parts of go-yaml v2's
emitterc.go (itself a port of libyaml); names follow it so the two can be read side
by side. PyYAML's emitter differs in what it calls printable and in how it folds.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import re
import unicodedata

BEST_INDENT, BEST_WIDTH = 2, 80


# ---------------------------------------------------------------- sprig
def indent(spaces: int, text: str) -> str:
    pad = " " * spaces
    return pad + text.replace("\n", "\n" + pad)


def nindent(spaces: int, text: str) -> str:
    return "\n" + indent(spaces, text)


_PRINTF_VERB = re.compile(r"%([qds%])")


def printf(format: str, *args) -> str:
    """fmt.Sprintf with %q (strconv.Quote), %d (an integer), %s and %%."""
    values = iter(args)

    def verb(match: re.Match) -> str:
        kind = match.group(1)
        if kind == "%":
            return "%"
        value = next(values)
        return quote(str(value)) if kind == "q" else str(int(value)) if kind == "d" else str(value)

    return _PRINTF_VERB.sub(verb, format)


def quote(text: str) -> str:
    """fmt.Sprintf("%q", text): Go's strconv.Quote."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():  # Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols, ASCII space
            out.append(ch)
        elif ch in _GO_SHORT_ESCAPES:
            out.append(_GO_SHORT_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_GO_SHORT_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


# ---------------------------------------------------------------- encoding/json
def _shortest(x: float) -> tuple[str, str, int]:
    """x's shortest round-trip digits, as strconv finds them: (sign, digits, decimal point position)."""
    _, digits, exp = decimal.Decimal(repr(abs(x))).as_tuple()
    text = "".join(map(str, digits))
    point = len(text) + exp
    return ("-" if str(x).startswith("-") else ""), (text.rstrip("0") or "0"), point


def _fixed(sign: str, digits: str, point: int) -> str:
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _exponent(sign: str, digits: str, point: int, min_digits: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    exponent = point - 1
    return f"{sign}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):0{min_digits}d}"


def go_float(x: float) -> str:
    """encoding/json's float64: shortest digits, exponent only below 1e-6 or from 1e21 (e-07 -> e-7)."""
    if x == 0:
        return "-0" if str(x).startswith("-") else "0"
    if abs(x) < 1e-6 or abs(x) >= 1e21:
        return _exponent(*_shortest(x), min_digits=1)
    return _fixed(*_shortest(x))


def go_int_or_float(value):
    """A number as json.Marshal then go-yaml's decoder type it: integral floats below 1e21 are ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def _json_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t\b\f":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}[ch])
        elif code < 0x20 or ch in "<>&\u2028\u2029":  # Go escapes HTML characters and JS line separators
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json(value, _indent: str | None = None, _level: int = 0) -> str:
    """json.Marshal (toJson) or, with _indent, json.MarshalIndent(v, "", _indent) (toPrettyJson)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) and abs(value) < 1e21:  # --set gives int64; files give float64 (same digits)
        return str(value)
    if isinstance(value, (int, float)):
        return go_float(float(value))
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, dict):
        items = [(_json_string(str(k)), v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]).encode())]
        parts = [f"{k}:{' ' if _indent is not None else ''}{to_json(v, _indent, _level + 1)}" for k, v in items]
        return _join("{", parts, "}", _indent, _level)
    if isinstance(value, (list, tuple)):
        return _join("[", [to_json(v, _indent, _level + 1) for v in value], "]", _indent, _level)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _join(open_: str, parts: list[str], close: str, _indent: str | None, level: int) -> str:
    if not parts:
        return open_ + close
    if _indent is None:
        return open_ + ",".join(parts) + close
    inner, outer = "\n" + _indent * (level + 1), "\n" + _indent * level
    return open_ + inner + ("," + inner).join(parts) + outer + close


def to_pretty_json(value) -> str:
    return to_json(value, "  ")


# ---------------------------------------------------------------- go-yaml v2: what a string resolves to
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_BASE60_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_NOT_STRINGS = {*"y Y yes Yes YES true True TRUE on On ON n N no No NO false False FALSE off Off OFF".split(),
                "", "~", "null", "Null", "NULL", ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF",
                "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF"}
_GO_INT = re.compile(r"^[-+]?(?:0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)$")
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:(?:[Tt](\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.\d{1,9})?(?:Z|[-+]\d{2}:\d{2}))"
    r"|(?: (\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.\d{1,9})?))?$")


def _resolves_to_string(text: str) -> bool:
    """go-yaml v2's resolve("", text) is !!str: the text needs no quotes to stay a string."""
    if text in _NOT_STRINGS:
        return False
    first = text[0]
    if first == ".":
        return not _go_parse_float(text)
    if first in "+-0123456789":
        if first.isdigit() and _is_timestamp(text):
            return False
        plain = text.replace("_", "")
        if _GO_INT.match(plain) and _int_fits(plain):
            return False
        if _YAML_FLOAT.match(plain):
            return False
        if re.fullmatch(r"-?0b[01]+", plain):
            return False
    return True


def _go_parse_float(text: str) -> bool:
    """strconv.ParseFloat succeeds (decimal forms; only reached for text starting with '.')."""
    return bool(re.fullmatch(r"\.[0-9]+([eE][-+]?[0-9]+)?", text))


def _int_fits(plain: str) -> bool:
    body = plain.lstrip("+-")
    base = {"0x": 16, "0X": 16, "0o": 8, "0O": 8, "0b": 2, "0B": 2}.get(body[:2], 8 if body.startswith("0") else 10)
    digits = body[2:] if base in (16, 2) or body[:2] in ("0o", "0O") else body
    value = int(digits or "0", base)
    return value < 2**64 if not plain.startswith("-") else value <= 2**63


def _is_timestamp(text: str) -> bool:
    m = _TIMESTAMP.match(text)
    if not m:
        return False
    year, month, day = (int(g) for g in m.group(1, 2, 3))
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    clock = m.group(4, 5, 6) if m.group(4) else m.group(7, 8, 9)
    if clock[0] is None:
        return True
    hour, minute, second = (int(g) for g in clock)
    return hour < 24 and minute < 60 and second < 60


# ---------------------------------------------------------------- go-yaml v2: key order (sorter.go)
def _key_less(a: str, b: str) -> bool:
    for i, (ca, cb) in enumerate(zip(a, b)):
        if ca == cb:
            continue
        la, lb = _is_letter(ca), _is_letter(cb)
        if la and lb:
            return ca < cb
        if la or lb:
            return lb
        an = bn = 0
        if ca == "0" or cb == "0":
            j = i - 1
            while j >= 0 and a[j].isdigit():
                if a[j] != "0":
                    an = bn = 1
                    break
                j -= 1
        ai = i
        while ai < len(a) and _is_digit(a[ai]):
            an = _int64(an * 10 + int(a[ai]))
            ai += 1
        bi = i
        while bi < len(b) and _is_digit(b[bi]):
            bn = _int64(bn * 10 + int(b[bi]))
            bi += 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return ca < cb
    return len(a) < len(b)


def _int64(n: int) -> int:
    """Go's int64 arithmetic: long digit runs wrap around."""
    return (n + 2**63) % 2**64 - 2**63


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def _sorted_keys(keys) -> list[str]:
    return sorted(keys, key=functools.cmp_to_key(lambda a, b: -1 if _key_less(a, b) else (1 if _key_less(b, a) else 0)))


# ---------------------------------------------------------------- go-yaml v2: the emitter (emitterc.go)
_BREAKS = "\r\n\x85\u2028\u2029"


def _printable(ch: str) -> bool:
    code = ord(ch)
    return (ch == "\n" or 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF
            or (0xE000 <= code <= 0xFFFD and code != 0xFEFF))


class _Analysis:
    def __init__(self, value: str):
        self.multiline = False
        if not value:
            self.flow_plain = False
            self.block_plain = self.single_quoted = True
            self.block = False
            return
        block_ind = flow_ind = line_breaks = special = False
        leading_space = leading_break = trailing_space = trailing_break = break_space = space_break = False
        previous_space = previous_break = False
        if value.startswith("---") or value.startswith("..."):
            block_ind = flow_ind = True
        preceded_by_ws = True
        n = len(value)
        for i, ch in enumerate(value):
            followed_by_ws = i + 1 >= n or value[i + 1] in " \t"
            if i == 0:
                if ch in "#,[]{}&*!|>'\"%@`":
                    flow_ind = block_ind = True
                elif ch in "?:":
                    flow_ind = True
                    block_ind = block_ind or followed_by_ws
                elif ch == "-" and followed_by_ws:
                    flow_ind = block_ind = True
            else:
                if ch in ",?[]{}":
                    flow_ind = True
                elif ch == ":":
                    flow_ind = True
                    block_ind = block_ind or followed_by_ws
                elif ch == "#" and preceded_by_ws:
                    flow_ind = block_ind = True
            if not _printable(ch):
                special = True
            if ch == " ":
                leading_space = leading_space or i == 0
                trailing_space = trailing_space or i == n - 1
                break_space = break_space or previous_break
                previous_space, previous_break = True, False
            elif ch in _BREAKS:
                line_breaks = True
                leading_break = leading_break or i == 0
                trailing_break = trailing_break or i == n - 1
                space_break = space_break or previous_space
                previous_space, previous_break = False, True
            else:
                previous_space = previous_break = False
            preceded_by_ws = ch in " \t\0" or ch in _BREAKS
        self.multiline = line_breaks
        self.flow_plain = self.block_plain = self.single_quoted = self.block = True
        if leading_space or leading_break or trailing_space or trailing_break:
            self.flow_plain = self.block_plain = False
        if trailing_space:
            self.block = False
        if break_space:
            self.flow_plain = self.block_plain = self.single_quoted = False
        if space_break or special:
            self.flow_plain = self.block_plain = self.single_quoted = self.block = False
        if line_breaks:
            self.flow_plain = self.block_plain = False
        if flow_ind:
            self.flow_plain = False
        if block_ind:
            self.block_plain = False


class _Emitter:
    def __init__(self):
        self.out: list[str] = []
        self.column = 0
        self.indent = -1
        self.indents: list[int] = []
        self.whitespace = self.indention = True
        self.flow_level = 0
        self.mapping_context = self.simple_key_context = False

    # -- output primitives
    def put(self, ch: str) -> None:
        self.out.append(ch)
        self.column += 1

    def put_break(self) -> None:
        self.out.append("\n")
        self.column = 0

    def write_break(self, ch: str) -> None:
        if ch == "\n":
            self.put_break()
        else:
            self.out.append(ch)
            self.column = 0

    def increase_indent(self, flow: bool, indentless: bool) -> None:
        self.indents.append(self.indent)
        if self.indent < 0:
            self.indent = BEST_INDENT if flow else 0
        elif not indentless:
            self.indent += BEST_INDENT

    def pop_indent(self) -> None:
        self.indent = self.indents.pop()

    def write_indent(self) -> None:
        target = max(self.indent, 0)
        if not self.indention or self.column > target or (self.column == target and not self.whitespace):
            self.put_break()
        while self.column < target:
            self.put(" ")
        self.whitespace = self.indention = True

    def write_indicator(self, text: str, need_whitespace: bool, is_whitespace: bool, is_indention: bool) -> None:
        if need_whitespace and not self.whitespace:
            self.put(" ")
        for ch in text:
            self.put(ch)
        self.whitespace = is_whitespace
        self.indention = self.indention and is_indention

    # -- nodes
    def node(self, value, *, mapping: bool = False, simple_key: bool = False) -> None:
        self.mapping_context, self.simple_key_context = mapping, simple_key
        if isinstance(value, dict):
            self.mapping(value) if value else self.empty("{", "}")
        elif isinstance(value, list):
            self.sequence(value) if value else self.empty("[", "]")
        else:
            self.scalar(*_scalar(value))

    def empty(self, open_: str, close: str) -> None:
        self.write_indicator(open_, True, True, False)
        self.increase_indent(True, False)
        self.pop_indent()
        self.write_indicator(close, False, False, False)

    def sequence(self, items: list) -> None:
        self.increase_indent(False, self.mapping_context and not self.indention)
        for item in items:
            self.write_indent()
            self.write_indicator("-", True, False, True)
            self.node(item)
        self.pop_indent()

    def mapping(self, items: dict) -> None:
        self.increase_indent(False, False)
        for key in _sorted_keys(items):
            self.write_indent()
            text = key
            analysis = _Analysis(text)
            if not analysis.multiline and len(text.encode()) <= 128:
                self.node(key, mapping=True, simple_key=True)
                self.write_indicator(":", False, False, False)
            else:
                self.write_indicator("?", True, False, True)
                self.node(key, mapping=True)
                self.write_indent()
                self.write_indicator(":", True, False, True)
            self.node(items[key], mapping=True)
        self.pop_indent()

    def scalar(self, text: str, style: str) -> None:
        analysis = _Analysis(text)
        if self.simple_key_context and analysis.multiline:
            style = '"'
        if style == "plain":
            if (self.flow_level > 0 and not analysis.flow_plain) or (self.flow_level == 0 and not analysis.block_plain):
                style = "'"
            if not text and (self.flow_level > 0 or self.simple_key_context):
                style = "'"
        if style == "'" and not analysis.single_quoted:
            style = '"'
        if style == "|" and (not analysis.block or self.flow_level > 0 or self.simple_key_context):
            style = '"'
        self.increase_indent(True, False)
        allow_breaks = not self.simple_key_context
        {"plain": self.write_plain, "'": self.write_single_quoted, '"': self.write_double_quoted,
         "|": lambda v, _: self.write_literal(v)}[style](text, allow_breaks)
        self.pop_indent()

    # -- scalar writers
    def write_plain(self, value: str, allow_breaks: bool) -> None:
        self._write_unescaped(value, allow_breaks, quoted=False)

    def write_single_quoted(self, value: str, allow_breaks: bool) -> None:
        self._write_unescaped(value, allow_breaks, quoted=True)

    def _write_unescaped(self, value: str, allow_breaks: bool, quoted: bool) -> None:
        """go-yaml's write_plain_scalar and write_single_quoted_scalar, one loop: the quoted form adds the
        quotes, doubles a `'` and never folds at the first or last character."""
        if quoted:
            self.write_indicator("'", True, False, False)
        elif not self.whitespace:
            self.put(" ")
        spaces = breaks = False
        n = len(value)
        for i, ch in enumerate(value):
            nxt = value[i + 1] if i + 1 < n else ""
            if ch == " ":
                foldable = not quoted or 0 < i < n - 1
                if allow_breaks and not spaces and self.column > BEST_WIDTH and foldable and nxt != " ":
                    self.write_indent()
                else:
                    self.put(ch)
                spaces = True
            elif ch in _BREAKS:
                if not breaks and ch == "\n":
                    self.put_break()
                self.write_break(ch)
                self.indention = breaks = True
            else:
                if breaks:
                    self.write_indent()
                if quoted and ch == "'":
                    self.put("'")
                self.put(ch)
                self.indention = spaces = breaks = False
        if quoted:
            self.write_indicator("'", False, False, False)
        self.whitespace = self.indention = False

    def write_double_quoted(self, value: str, allow_breaks: bool) -> None:
        spaces = False
        self.write_indicator('"', True, False, False)
        n = len(value)
        starts_with_bom = value.startswith("\ufeff")  # go-yaml's is_bom looks at the first character only
        for i, ch in enumerate(value):
            code = ord(ch)
            if not _printable(ch) or starts_with_bom or ch in _BREAKS or ch in '"\\':
                self.put("\\")
                if ch in _YAML_ESCAPES:
                    self.put(_YAML_ESCAPES[ch])
                else:
                    width, letter = (2, "x") if code <= 0xFF else (4, "u") if code <= 0xFFFF else (8, "U")
                    for digit in letter + f"{code:0{width}X}":
                        self.put(digit)
                spaces = False
            elif ch == " ":
                if allow_breaks and not spaces and self.column > BEST_WIDTH and 0 < i < n - 1:
                    self.write_indent()
                    if i + 1 < n and value[i + 1] == " ":
                        self.put("\\")
                else:
                    self.put(ch)
                spaces = True
            else:
                self.put(ch)
                spaces = False
        self.write_indicator('"', False, False, False)
        self.whitespace = self.indention = False

    def write_literal(self, value: str) -> None:
        self.write_indicator("|", True, False, False)
        if value[:1] == " " or value[:1] in _BREAKS and value:
            self.write_indicator(str(BEST_INDENT), False, False, False)
        chomp = ""
        if not value or value[-1] not in _BREAKS:
            chomp = "-"
        elif len(value) == 1 or value[-2] in _BREAKS:
            chomp = "+"
        if chomp:
            self.write_indicator(chomp, False, False, False)
        self.put_break()
        self.indention = self.whitespace = True
        breaks = True
        for ch in value:
            if ch in _BREAKS:
                self.write_break(ch)
                self.indention = breaks = True
            else:
                if breaks:
                    self.write_indent()
                self.put(ch)
                self.indention = breaks = False


_YAML_ESCAPES = {"\0": "0", "\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f", "\r": "r",
                 "\x1b": "e", '"': '"', "\\": "\\", "\x85": "N", "\xa0": "_", "\u2028": "L", "\u2029": "P"}


def _scalar(value) -> tuple[str, str]:
    """The text and requested style go-yaml v2's encoder gives a JSON-decoded value (encode.go)."""
    value = go_int_or_float(value)
    if value is None:
        return "null", "plain"
    if isinstance(value, bool):
        return ("true" if value else "false"), "plain"
    if isinstance(value, int):
        return str(value), "plain"
    if isinstance(value, float):
        return _go_g(value), "plain"
    text = str(value)
    if "\n" in text:
        return text, "|"
    plain = _resolves_to_string(text) and not (text[:1] in "+-0123456789" and ":" in text
                                               and _BASE60_FLOAT.match(text))
    return text, "plain" if plain else '"'


def _go_g(x: float) -> str:
    """strconv.FormatFloat(x, 'g', -1, 64), with go-yaml's .inf/.nan: exponent below 1e-4 or from 1e6."""
    if x != x:
        return ".nan"
    if x in (float("inf"), float("-inf")):
        return ".inf" if x > 0 else "-.inf"
    if x == 0:
        return "-0" if str(x).startswith("-") else "0"
    sign, digits, point = _shortest(x)
    if point - 1 < -4 or point - 1 >= 6:
        return _exponent(sign, digits, point, min_digits=2)
    return _fixed(sign, digits, point)


def to_yaml(value) -> str:
    """Helm's toYaml: sigs.k8s.io/yaml.Marshal, the trailing newline trimmed; "" where it fails, as Helm
    swallows the error."""
    try:
        data = _json_round_trip(value)
    except ValueError:
        return ""
    emitter = _Emitter()
    emitter.node(data)
    emitter.indent = -1
    emitter.write_indent()
    return "".join(emitter.out).removesuffix("\n")


# Characters json.Marshal writes raw that go-yaml's reader then refuses (the whole toYaml fails),
# and NEL, a raw line break inside the JSON string that go-yaml folds into a space.
_UNREADABLE = re.compile("[\x7f\x80-\x84\x86-\x9f\ufffe\uffff]")
_FOLDED_NEL = re.compile("(?: *\x85)+ *")


def _json_round_trip(value):
    """What json.Marshal then go-yaml's Unmarshal make of a value: string keys, integral floats as ints."""
    if isinstance(value, dict):
        keys = [str(k) if not isinstance(k, bool) else json.dumps(k) for k in value]
        if any("\x85" in k for k in keys):  # a line break inside a flow key: go-yaml cannot read it back
            raise ValueError(keys)
        return {_json_round_trip(k): _json_round_trip(v) for k, v in zip(keys, value.values())}
    if isinstance(value, (list, tuple)):
        return [_json_round_trip(v) for v in value]
    if isinstance(value, str):
        if _UNREADABLE.search(value):
            raise ValueError(value)
        return _FOLDED_NEL.sub(lambda m: "\n" * (m.group().count("\x85") - 1) or " ", value)
    return go_int_or_float(value)
