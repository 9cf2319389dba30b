"""User data files: both formats from JSON lines and parquet, format detection, ids, and every error case."""

import json

import pyarrow
import pyarrow.parquet
import pytest

from distill.recipe import FileSource
from eval.tasks import COLUMNS
from eval.userdata import load_file_source

GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in total?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {"question": "What is 1000 + 234?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
]
PROMPT_RESPONSE_ROWS = [
    {"prompt": "sort 3 1 2", "response": "#### 1 2 3"},
    {"prompt": "Say hi.", "response": "hi"},
]


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_parquet(path, rows) -> None:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


def _write(path, rows) -> None:
    (_write_parquet if path.suffix == ".parquet" else _write_jsonl)(path, rows)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("data_format", ["auto", "gsm8k"])
def test_gsm8k_rows(tmp_path, suffix: str, data_format: str) -> None:
    path = tmp_path / f"train{suffix}"
    _write(path, GSM8K_ROWS)
    data = load_file_source(FileSource(name="gsm", train_path=path, format=data_format))
    assert list(data) == ["train", "eval"] and len(data["eval"]) == 0
    assert data["eval"].column_names == list(COLUMNS)
    first, second = data["train"].to_list()
    assert first["prompt"] == GSM8K_ROWS[0]["question"]
    assert first["response"] == "In May she sold 48/2 = 24 clips.\nShe sold 48+24 = 72 clips.\n#### 72"
    assert (first["answer"], second["answer"]) == ("72", "1234")
    assert first["task"] == "gsm" and first["id"].startswith("gsm-")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("data_format", ["auto", "prompt_response"])
def test_prompt_response_rows(tmp_path, suffix: str, data_format: str) -> None:
    train, evaluation = tmp_path / f"train{suffix}", tmp_path / f"eval{suffix}"
    _write(train, PROMPT_RESPONSE_ROWS)
    _write(evaluation, PROMPT_RESPONSE_ROWS[:1])
    data = load_file_source(FileSource(name="mine", train_path=train, eval_path=evaluation, format=data_format))
    rows = data["train"].to_list()
    assert [(row["prompt"], row["response"], row["answer"]) for row in rows] == [
        ("sort 3 1 2", "#### 1 2 3", "1 2 3"),
        ("Say hi.", "hi", ""),
    ]
    assert all(tuple(row) == COLUMNS and row["task"] == "mine" for row in rows)
    # The same row in both splits still gets distinct ids.
    assert data["eval"][0]["prompt"] == rows[0]["prompt"]
    assert data["eval"][0]["id"] == rows[0]["id"] + "-2"


def test_ids_are_stable_and_unique(tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, [PROMPT_RESPONSE_ROWS[0], PROMPT_RESPONSE_ROWS[0], PROMPT_RESPONSE_ROWS[1]])
    source = FileSource(name="mine", train_path=path)
    ids = load_file_source(source)["train"]["id"]
    assert len(set(ids)) == 3
    assert load_file_source(source)["train"]["id"] == ids


def test_json_array_blank_lines_and_no_paths(tmp_path) -> None:
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(PROMPT_RESPONSE_ROWS, indent=2))
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n" + json.dumps(PROMPT_RESPONSE_ROWS[0]) + "\n\n" + json.dumps(PROMPT_RESPONSE_ROWS[1]))
    assert len(load_file_source(FileSource(name="a", train_path=array))["train"]) == 2
    assert len(load_file_source(FileSource(name="b", train_path=lines))["train"]) == 2
    empty = load_file_source(FileSource(name="c"))
    assert (len(empty["train"]), len(empty["eval"])) == (0, 0)
    assert empty["train"].column_names == list(COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file (and the line or row)


def _load_error(path, data_format: str = "auto") -> str:
    with pytest.raises(ValueError) as error:
        load_file_source(FileSource(name="mine", eval_path=path, format=data_format))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_column_in_jsonl_names_the_line(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, [GSM8K_ROWS[0], {"question": "no answer here"}])
    assert "line 2: missing column 'answer' (format gsm8k)" in _load_error(path)


def test_missing_column_in_parquet_names_the_row(tmp_path) -> None:
    path = tmp_path / "eval.parquet"
    _write_parquet(path, [{"prompt": "p", "answer": "#### 1"}])
    assert "row 1: missing column 'response'" in _load_error(path, "prompt_response")
    assert "cannot detect the format" in _load_error(path)


def test_explicit_format_with_the_other_format_columns(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, PROMPT_RESPONSE_ROWS)
    assert "line 1: missing column 'question'" in _load_error(path, "gsm8k")


def test_gsm8k_answer_without_marker(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, [GSM8K_ROWS[0], GSM8K_ROWS[1], {"question": "q", "answer": "just 5"}])
    assert "line 3: gsm8k answer has no '#### <final answer>'" in _load_error(path)
    _write_jsonl(path, [{"question": "q", "answer": "5 ####  "}])
    assert "line 1: gsm8k answer is empty" in _load_error(path)


def test_corrupt_jsonl_names_the_line(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(PROMPT_RESPONSE_ROWS[0]) + '\n{"prompt": "cut off\n')
    assert "line 2: invalid JSON" in _load_error(path)
    path.write_text(json.dumps(PROMPT_RESPONSE_ROWS[0]) + "\n[1, 2]\n")
    assert "line 2: expected a JSON object, got list" in _load_error(path)
    array = tmp_path / "eval.json"
    array.write_text(json.dumps([PROMPT_RESPONSE_ROWS[0], 7]))
    assert "row 2: expected a JSON object, got int" in _load_error(array)
    array.write_text('[{"prompt": "p",')
    assert "line 1: invalid JSON" in _load_error(array)
    path.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    assert "cannot read as UTF-8" in _load_error(path)


def test_non_string_value_names_the_line(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, [{"prompt": "p", "response": 5}])
    assert "line 1: column 'response' must be a string, got int" in _load_error(path)


def test_corrupt_parquet(tmp_path) -> None:
    path = tmp_path / "eval.parquet"
    path.write_bytes(b"this is not parquet at all")
    assert "not a readable parquet file" in _load_error(path)


def test_unsupported_extension(tmp_path) -> None:
    path = tmp_path / "eval.csv"
    path.write_text("prompt,response\n")
    assert "unsupported file type '.csv'" in _load_error(path)


def test_file_removed_after_the_recipe_was_validated(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, PROMPT_RESPONSE_ROWS)
    source = FileSource(name="mine", eval_path=path)
    path.unlink()
    with pytest.raises(ValueError, match=r"eval\.jsonl: file not found"):
        load_file_source(source)
