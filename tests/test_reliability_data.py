"""Bad data rows (task.on_bad_rows=error|skip): every kind fails naming file, line/row and
column, or is skipped and counted."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from fedlora.tasks.text_file import load_examples

GOOD = [{"text": f"example {i}", "label": ["a", "b"][i % 2]} for i in range(6)]


def jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r).encode() for r in rows]
    for at, raw in raw_lines:
        lines.insert(at, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# (name, raw line inserted at index 2 -> file line 3, expected column, expected reason)
JSONL_CASES = [
    ("not_json", b'{"text": "x", "label": ', None, "not valid JSON"),
    ("not_object", b'["x", "a"]', None, "not a JSON object"),
    ("no_text", b'{"label": "a"}', "text", "is missing"),
    ("null_label", b'{"text": "x", "label": null}', "label", "is missing"),
    ("empty_text", b'{"text": "   ", "label": "a"}', "text", "is empty"),
    ("text_not_string", b'{"text": 5, "label": "a"}', "text", "must be text"),
    ("label_is_list", b'{"text": "x", "label": ["a"]}', "label", "single value"),
    ("non_utf8", b'{"text": "caf\xe9", "label": "a"}', None, "not valid UTF-8"),
]


@pytest.mark.parametrize("name,raw,column,reason", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_jsonl_bad_row_errors_name_file_line_column_or_are_skipped(tmp_path, caplog, name, raw,
                                                                   column, reason):
    p = jsonl(tmp_path / f"{name}.jsonl", GOOD, [(2, raw)])
    with pytest.raises(ValueError) as e:
        load_examples(str(p))
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and reason in msg, msg
    assert column is None or f"column {column!r}" in msg
    assert "task.on_bad_rows=skip" in msg
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        ex = load_examples(str(p), "skip")
    assert len(ex.inputs) == len(GOOD) and ex.bad_rows["skipped"] == 1
    assert "skipped 1 bad row" in caplog.text and str(p) in caplog.text
    assert "line 3" in ex.bad_rows["examples"][0]


def test_many_bad_rows_are_counted_by_reason(tmp_path):
    raws = [(1, b"nope"), (3, b'{"text": "", "label": "a"}'), (5, b'{"text": "y"}'),
            (6, b"\xff\xfe"), (7, b"")]  # the blank line is not a row at all
    p = jsonl(tmp_path / "many.jsonl", GOOD, raws)
    ex = load_examples(str(p), "skip")
    assert ex.bad_rows["skipped"] == 4 and len(ex.inputs) == 6
    assert ex.bad_rows["reasons"] == {"not valid JSON": 1, "text: is empty": 1,
                                      "label: is missing": 1, "not valid UTF-8": 1}


def test_one_class_label_column_is_an_error_even_when_skipping(tmp_path):
    p = jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "a"},
                                       {"text": "z", "label": "b", "junk": 1}][:2])
    with pytest.raises(ValueError, match="column 'label' has only one class"):
        load_examples(str(p))
    p = jsonl(tmp_path / "one2.jsonl", GOOD[:1], [(1, b'{"text": "q", "label": null}')])
    with pytest.raises(ValueError, match="only one class .* after skipping 1 bad row"):
        load_examples(str(p), "skip")


def test_csv_with_a_bom_reads_and_bad_csv_rows_are_named(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbftext,label\nhello there,a\nbye now,b\n")
    ex = load_examples(str(p))
    assert ex.inputs == ["hello there", "bye now"] and ex.labels == ["a", "b"]
    p = tmp_path / "bad.csv"
    p.write_bytes(b"text,label\nhello,a\n,b\nok,\nfine,b\n\xff,a\nalso,a,extra\n")
    with pytest.raises(ValueError, match=r"bad.csv row 2 column .text.: is missing"):
        load_examples(str(p))
    ex = load_examples(str(p), "skip")
    assert ex.inputs == ["hello", "fine"] and ex.bad_rows["skipped"] == 4
    assert ex.bad_rows["reasons"] == {"not valid UTF-8": 1, "text: is missing": 1,
                                      "label: is missing": 1, "has 3 fields, the header has 2": 1}


def test_parquet_with_wrong_types_names_the_column(tmp_path):
    p = tmp_path / "typed.parquet"
    pd.DataFrame({"text": [1, 2, 3], "label": ["a", "b", "a"]}).to_parquet(p)
    with pytest.raises(ValueError, match=r"typed.parquet row 1 column 'text': must be text"):
        load_examples(str(p))
    p = tmp_path / "nan.parquet"
    pd.DataFrame({"text": ["x", "y", "z"], "label": [1.0, float("nan"), 2.0]}).to_parquet(p)
    with pytest.raises(ValueError, match=r"row 2 column 'label': is missing"):
        load_examples(str(p))
    ex = load_examples(str(p), "skip")
    assert ex.inputs == ["x", "z"] and ex.bad_rows["skipped"] == 1


def test_missing_column_and_all_rows_bad(tmp_path):
    p = jsonl(tmp_path / "cols.jsonl", [{"text": "x", "lbl": "a"}])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        load_examples(str(p), "skip")
    p = jsonl(tmp_path / "allbad.jsonl", [{"text": "", "label": "a"}, {"text": " ", "label": "b"}])
    with pytest.raises(ValueError, match="no valid rows"):
        load_examples(str(p), "skip")
