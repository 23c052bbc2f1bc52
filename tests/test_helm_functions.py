"""The Go functions the chart calls print, in kubetrain render, what the helm binary prints.

A throwaway chart prints `toYaml`, `toJson | quote` and `toPrettyJson` of generated values
(odd keys and strings: YAML indicators, words YAML 1.1 reads as booleans or numbers,
long lines that fold, unicode that go-yaml escapes, multi-line text); one `helm template`
per batch, compared document by document with trainer/controller/helm_functions.py.
Values reach both sides through the same JSON values file, read as each reads it.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from test_chart_parity import HELM, helm
from trainer.controller.helm_functions import nindent, quote, to_json, to_pretty_json, to_yaml
from trainer.values import load_values_file

pytestmark = pytest.mark.skipif(not HELM, reason="helm not found: run `eval \"$(scripts/install-test-tools.sh)\"`")

TEMPLATE = """\
{{- range .Values.cases }}
---
kind: Yaml
v:
  {{- toYaml . | nindent 2 }}
---
kind: Json
j: {{ toJson . | quote }}
p: |
  {{- toPrettyJson . | nindent 2 }}
{{- end }}
"""
# Left out, because go-yaml itself writes YAML that helm cannot read back (so there is nothing
# to compare): NEL and the Unicode line separators inside a literal block, a `<<` key, and DEL
# and the C1 controls, which toPrettyJson leaves raw inside the `p: |` block. Keys with leading
# zeros ("08") or 19 digits and more are too: go-yaml's key order is not transitive for them (its
# digit runs overflow int64), so helm's own order changes with Go's random map order. Unassigned
# code points are left out: Go's Unicode tables are newer than Python's (what %q escapes).
CHARS = st.one_of(st.sampled_from(list("abXZ09 _-.:#,[]{}&*!|>'\"%@`?~=\\\t\n\r\x01\xa0é\u3000\u00ad\ufeff😀")),
                  st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn", "Zl", "Zp")))
WORDS = st.sampled_from([
    "y", "yes", "No", "on", "OFF", "true", "null", "~", "", "0x1F", "0o17", "017", "08", "1_000", "1e3", ".5", ".inf",
    "+1", "-0b11", "2001-12-14", "2001-12-14T21:59:43Z", "1:30", "-", "---", "...", "a: b", "a #b", "#x", " lead",
    "trail ", "12345678901234567890", "a10", "a9", "A_", "x" * 90, "word " * 30, "a\n b", "trail\n\n"])
TEXT = st.one_of(WORDS, st.text(CHARS, max_size=20))
SCALARS = st.one_of(TEXT, st.booleans(), st.none(), st.integers(-(2**53), 2**53),
                    st.sampled_from([0.5, 1e-7, 1.5e-7, 1e21, 1234567.5, 0.0001, 1e-5, 3.0, -2.5, 1e100]))
KEYS = TEXT.filter(lambda key: not re.search(r"\d{19}|(?<!\d)0\d", key))  # see above
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
CASES = st.lists(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4), min_size=30, max_size=30)


def yaml_safe_json(document) -> str:
    """JSON that PyYAML reads too: the characters its reader refuses or takes for line breaks escaped."""
    text = json.dumps(document, ensure_ascii=False)
    return "".join(ch if ch in "\t\n\r" or 0x20 <= ord(ch) <= 0x7E or 0xA0 <= ord(ch) <= 0xD7FF
                   or 0xE000 <= ord(ch) <= 0xFFFD and ch != "\ufeff" or ord(ch) > 0xFFFF
                   else f"\\u{ord(ch):04x}" for ch in text)


# No shrinking (slow with helm in the loop): a failure names the value that differs.
@settings(max_examples=20, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(cases=CASES)
def test_go_functions_print_what_helm_prints(cases, tmp_path_factory):
    chart = tmp_path_factory.mktemp("chart")
    (chart / "templates").mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: fuzz\nversion: 0.1.0\n")
    (chart / "templates" / "t.yaml").write_text(TEMPLATE)
    values = chart / "values.json"
    values.write_text(yaml_safe_json({"cases": cases}), encoding="utf-8")
    result = helm("template", "fuzz", str(chart), "-f", str(values))
    assert result.returncode == 0, result.stderr
    theirs = [d for d in re.split(r"^---\n# Source: fuzz/templates/t.yaml\n", result.stdout, flags=re.M) if d]
    loaded = load_values_file(values)["cases"]
    ours = [f"kind: Json\nj: {quote(to_json(case))}\np: |{nindent(2, to_pretty_json(case))}".strip() + "\n"
             for case in loaded]
    ours += [f"kind: Yaml\nv:{nindent(2, to_yaml(case))}".strip() + "\n" for case in loaded]
    assert len(theirs) == len(ours)
    for helm_doc, our_doc, case in zip(theirs, ours, loaded + loaded):  # helm sorts unknown kinds by name: Json first
        assert our_doc == helm_doc, f"value: {case!r}"
