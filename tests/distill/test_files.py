"""Atomic writes leave the old file or the new one, never a temp file or half of one."""

import json

from distill.files import write_atomically, write_json


def test_write_atomically_creates_parents_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    write_atomically(path, "first")
    write_atomically(path, b"second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_write_json_is_indented_with_trailing_newline(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1, "a": [2]})
    text = (tmp_path / "x.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"b": 1, "a": [2]} and '\n  "b": 1' in text
