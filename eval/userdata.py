"""User data from local JSON-lines or parquet files, turned into task records with the built-in tasks' schema.

A `FileSource` names a train file and/or an eval file: JSON lines (`.jsonl`, or `.json`, which may instead hold one
JSON array of rows) or parquet (`.parquet`), with rows in one of two formats:

- `gsm8k`: rows with `question` and `answer`, where `answer` is `<reasoning> #### <final>`. The prompt is the
  question, the response is the answer text with GSM8K's `<<48/2=24>>` calculator annotations removed, and the
  answer is the normalised text after `####`.
- `prompt_response`: rows with `prompt` and `response`; the answer is what follows the last `####` in the
  response, or "" when there is none (such records train but can never be scored correct).

`auto` picks `prompt_response` when a file's first row has `prompt` and `response`, else `gsm8k` when it has
`question` and `answer`. Every problem (missing file or column, unreadable, corrupt, empty or blank file,
unsupported extension, a gsm8k answer without `####`) raises ValueError with a one-line message naming the file
and, where there is one, the 1-based line (JSON lines) or row (parquet). `record_location` finds the line of a
record again, for errors found later (a character the tokenizer cannot encode, a prompt too long for the model).

Rows of either format may carry images (Dimple's prompts), shown to the model in order before the prompt text:
`image` (one) or `images` (a list; not both). In JSON an image is a path, relative to the data file's folder;
in parquet it may also be the image's bytes or a `{"bytes": ..., "path": ...}` struct as `datasets` writes it
(bytes first, else the path). Each is opened and checked once here (`teachers.vision.open_image`): a missing,
unreadable, truncated, zero-size or 16-bit/float image is an `ImageError` naming the file, the row and the image.
A prompt or response holding a vision token (`<|image_pad|>`, ...) is refused too: fewstep's chat formatting
places the image tokens, so a hand-written one would be image tokens without an image. Ids then also cover the
images' content hashes, and `image_files` lists the files rows name, for the stored data's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow
import pyarrow.parquet
from datasets import DatasetDict

from distill.recipe import FileSource
from eval.tasks import ANSWER_MARKER, IMAGES, extract_answer, make_record, records_to_dataset
from teachers.vision import image_sha256, open_image, written_vision_token

FORMAT_COLUMNS = {"gsm8k": ("question", "answer"), "prompt_response": ("prompt", "response")}
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def load_file_source(source: FileSource) -> DatasetDict:
    """Both splits of a file source as a `DatasetDict` (`train` from `train_path`, `eval` from `eval_path`).

    A missing path gives an empty split. Ids are `<name>-<sha1(prompt, response)[:12]>`, with `-2`, `-3`, ...
    appended to repeats so they stay unique across both splits.
    """
    id_counts: Counter[str] = Counter()
    records = {}
    for split, path in (("train", source.train_path), ("eval", source.eval_path)):
        records[split] = [] if path is None else _records_from_file(source, Path(path), id_counts)
    # Both splits get the image column when either has images, so the two have one schema.
    images = any(record.get(IMAGES) for split_records in records.values() for record in split_records)
    return DatasetDict({split: records_to_dataset(split_records, images) for split, split_records in records.items()})


def image_files(source: FileSource) -> list[Path] | None:
    """The image files the rows of `source`'s files name by path, in order (images given as bytes live in the data
    file itself); None when no row carries an image. A file or row that cannot be read is skipped: loading it
    reports the problem."""
    paths, any_images = [], False
    for data_path in (source.train_path, source.eval_path):
        try:
            rows = [] if data_path is None else _read_rows(Path(data_path))
        except ValueError:
            continue
        for where, row in rows:
            try:
                items = [item for _, item in _image_sources(Path(data_path), where, row)]
            except ValueError:
                continue
            any_images = any_images or bool(items)
            paths += [item for item in items if isinstance(item, Path)]
    return paths if any_images else None


def record_location(source: FileSource, record_id: str) -> str:
    """Where the record `record_id` of `source` comes from: `<file>: line N` (or `row N`); the source's name when
    no row gives that id."""
    id_counts: Counter[str] = Counter()
    for path in (source.train_path, source.eval_path):
        if path is not None:
            for where, record in _located_records(source, Path(path), id_counts):
                if record["id"] == record_id:
                    return f"{path}: {where}"
    return f"data.files ({source.name})"


def _records_from_file(source: FileSource, path: Path, id_counts: Counter[str]) -> list[dict]:
    return [record for _, record in _located_records(source, path, id_counts)]


def _located_records(source: FileSource, path: Path, id_counts: Counter[str]) -> list[tuple[str, dict]]:
    rows = _read_rows(path)
    if not rows:
        # An empty or blank file (a failed download, a redirect to the wrong file) is never meant as no data.
        raise ValueError(f"{path}: no rows (the file is empty or blank)")
    data_format = source.format if source.format != "auto" else _detect_format(path, rows[0][1])
    records = []
    for where, row in rows:
        prompt, response, answer = _convert_row(path, where, row, data_format)
        images = [open_image(item, f"{path}: {where}: {label}") for label, item in _image_sources(path, where, row)]
        key = "\0".join([prompt, response, *(image_sha256(image) for image in images)])
        base_id = f"{source.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        id_counts[base_id] += 1
        record_id = base_id if id_counts[base_id] == 1 else f"{base_id}-{id_counts[base_id]}"
        record = make_record(source.name, prompt, response, answer, record_id=record_id, images=images)
        records.append((where, record))
    return records


def _detect_format(path: Path, first_row: dict) -> str:
    for data_format in ("prompt_response", "gsm8k"):
        if all(column in first_row for column in FORMAT_COLUMNS[data_format]):
            return data_format
    columns = ", ".join(map(str, first_row)) or "none"
    raise ValueError(
        f"{path}: cannot detect the format from the columns ({columns}); expected question + answer (gsm8k) "
        f"or prompt + response (prompt_response)"
    )


def _convert_row(path: Path, where: str, row: dict, data_format: str) -> tuple[str, str, str]:
    values = []
    for column in FORMAT_COLUMNS[data_format]:
        if column not in row:
            raise ValueError(f"{path}: {where}: missing column '{column}' (format {data_format})")
        if not isinstance(row[column], str):
            kind = type(row[column]).__name__
            raise ValueError(f"{path}: {where}: column '{column}' must be a string, got {kind}")
        token = written_vision_token(row[column])
        if token is not None:
            raise ValueError(
                f"{path}: {where}: column '{column}' holds the vision token '{token}'; fewstep's chat formatting "
                f"places image tokens, give the image in an 'image' or 'images' column instead"
            )
        values.append(row[column])
    prompt, text = values
    if data_format == "prompt_response":
        return prompt, text, extract_answer(text) or ""
    answer = extract_answer(text)
    if answer is None:
        raise ValueError(f"{path}: {where}: gsm8k answer has no '{ANSWER_MARKER} <final answer>'")
    if not answer:
        raise ValueError(f"{path}: {where}: gsm8k answer is empty after '{ANSWER_MARKER}'")
    return prompt, _CALCULATOR_ANNOTATION.sub("", text), answer


def _image_sources(path: Path, where: str, row: dict) -> list[tuple[str, Path | bytes]]:
    """(label, source) of each image `row` carries: a path resolved against the data file's folder, or encoded
    bytes; the label (`image`, `image 2 (pics/b.png)`) names it in error messages."""
    single, many = row.get("image"), row.get(IMAGES)
    if single is not None and many is not None:
        raise ValueError(f"{path}: {where}: give 'image' or 'images', not both")
    if many is not None and not isinstance(many, list):
        raise ValueError(f"{path}: {where}: column 'images' must be a list of images, got {type(many).__name__}")
    items = [single] if single is not None else many or []
    sources = []
    for number, item in enumerate(items, start=1):
        label = "image" if single is not None else f"image {number}"
        if isinstance(item, dict):  # a `datasets` Image struct: the bytes when it has them, else its path
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytes):
            sources.append((label, item))
        elif isinstance(item, str) and item:
            sources.append((f"{label} ({item})", path.parent / item))
        else:
            kind = "an empty path" if item == "" else type(item).__name__
            raise ValueError(f"{path}: {where}: {label}: expected an image path or image bytes, got {kind}")
    return sources


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs: `where` is `line N` or `row N` (1-based) for error messages."""
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + PARQUET_SUFFIXES:
        supported = ", ".join(JSON_SUFFIXES + PARQUET_SUFFIXES)
        raise ValueError(f"{path}: unsupported file type '{suffix or path.name}' (use {supported})")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    return _read_json(path)


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a readable parquet file ({detail})") from None
    return [(f"row {index}", row) for index, row in enumerate(table.to_pylist(), start=1)]


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({type(error).__name__})") from None
    # A `.json` file may also hold one JSON array of rows, the other common way such files are written.
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
        return [_json_object(path, f"row {index}", item) for index, item in enumerate(items, start=1)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
        rows.append(_json_object(path, f"line {number}", item))
    return rows


def _json_object(path: Path, where: str, item: object) -> tuple[str, dict]:
    if not isinstance(item, dict):
        raise ValueError(f"{path}: {where}: expected a JSON object, got {type(item).__name__}")
    return where, item
