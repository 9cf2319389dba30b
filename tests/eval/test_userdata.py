"""User data files: both formats from JSON lines and parquet, format detection, ids, rows with images, and every
error case."""

import json

import pyarrow
import pyarrow.parquet
import pytest
from PIL import Image

from distill.recipe import FileSource
from eval.tasks import COLUMNS
from eval.userdata import load_file_source
from teachers.vision import image_sha256
from tests.bad_images import BAD_IMAGES, png_bytes

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


# ----------------------------------------------------------------------------------------------------------------
# Rows with images (Dimple): paths relative to the data file in JSON, bytes or `datasets` structs in parquet


def _picture(colour: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.putpixel((1, 2), (7, 8, 9))  # not a flat colour: a format that resized or recoloured would show
    return image


def _stored_images(dataset) -> list[list[str]]:
    # Iterating decodes the Image feature (`to_list` would give the raw {"bytes", "path"} dicts).
    return [[image_sha256(image) for image in row["images"]] for row in dataset]


def test_jsonl_rows_with_relative_image_paths(tmp_path) -> None:
    red, green, blue = _picture((200, 0, 0)), _picture((0, 200, 0)), _picture((0, 0, 200), (84, 56))
    (tmp_path / "data" / "pics").mkdir(parents=True)
    red.save(tmp_path / "data" / "pics" / "red.png")
    green.save(tmp_path / "data" / "green.jpg", quality=95)  # lossy: compared with its own decoding below
    blue.save(tmp_path / "data" / "pics" / "blue.png")
    rows = [
        {"question": "What colour?", "answer": "red #### red", "image": "pics/red.png"},
        {"question": "What colour?", "answer": "green #### green", "image": "green.jpg"},
        {"question": "Text only?", "answer": "yes #### yes"},
    ]
    train = tmp_path / "data" / "train.jsonl"
    _write_jsonl(train, rows)
    evaluation = tmp_path / "data" / "eval.jsonl"
    _write_jsonl(
        evaluation, [{"prompt": "Compare them.", "response": "#### 2", "images": ["pics/red.png", "pics/blue.png"]}]
    )
    data = load_file_source(FileSource(name="mine", train_path=train, eval_path=evaluation))
    green_pixels = image_sha256(Image.open(tmp_path / "data" / "green.jpg"))
    assert _stored_images(data["train"]) == [[image_sha256(red)], [green_pixels], []]
    assert _stored_images(data["eval"]) == [[image_sha256(red), image_sha256(blue)]]
    first = data["train"][0]
    assert (first["prompt"], first["response"], first["answer"]) == ("What colour?", "red #### red", "red")
    assert first["images"][0].size == (56, 56) and data["eval"][0]["images"][1].size == (84, 56)
    # The same question with another image is another record: the id covers the images' content.
    assert len(set(data["train"]["id"])) == 3
    assert data["train"].column_names == [*COLUMNS, "images"]


def test_a_split_without_images_gets_the_column_too(tmp_path) -> None:
    _picture((1, 2, 3)).save(tmp_path / "a.png")
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    _write_jsonl(train, [{"prompt": "p", "response": "#### 1", "image": "a.png"}])
    _write_jsonl(evaluation, PROMPT_RESPONSE_ROWS)
    data = load_file_source(FileSource(name="mine", train_path=train, eval_path=evaluation))
    assert data["eval"].column_names == [*COLUMNS, "images"] and _stored_images(data["eval"]) == [[], []]
    # A text-only source keeps exactly the five string columns.
    assert load_file_source(FileSource(name="text", train_path=evaluation))["train"].column_names == list(COLUMNS)


@pytest.mark.parametrize("data_format", ["gsm8k", "prompt_response"])
def test_parquet_rows_with_image_bytes(tmp_path, data_format: str) -> None:
    red, blue = _picture((200, 0, 0)), _picture((0, 0, 200))
    blue.save(tmp_path / "blue.png")
    text = {"gsm8k": ("question", "answer"), "prompt_response": ("prompt", "response")}[data_format]
    rows = [
        {text[0]: "One?", text[1]: "#### 1", "images": [{"bytes": png_bytes(red), "path": "ignored.png"}]},
        {
            text[0]: "Two?",
            text[1]: "#### 2",
            "images": [{"bytes": png_bytes(red), "path": None}, {"bytes": None, "path": "blue.png"}],
        },
        {text[0]: "None?", text[1]: "#### 0", "images": None},
    ]
    path = tmp_path / "train.parquet"
    _write_parquet(path, rows)
    data = load_file_source(FileSource(name="mine", train_path=path))
    assert _stored_images(data["train"]) == [[image_sha256(red)], [image_sha256(red), image_sha256(blue)], []]
    assert data["train"]["answer"] == ["1", "2", "0"]
    # One image as plain bytes in an `image` column.
    _write_parquet(path, [{text[0]: "One?", text[1]: "#### 1", "image": png_bytes(blue)}])
    assert _stored_images(load_file_source(FileSource(name="mine", train_path=path))["train"]) == [[image_sha256(blue)]]


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_a_bad_image_names_the_file_the_row_and_the_image(tmp_path, case: str) -> None:
    write, suffix, problem = BAD_IMAGES[case]
    image = tmp_path / "pics" / f"bad.{suffix}"
    image.parent.mkdir()
    write(image)
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, [PROMPT_RESPONSE_ROWS[0], {**PROMPT_RESPONSE_ROWS[1], "images": [f"pics/bad.{suffix}"]}])
    message = _load_error(path)
    assert f"{path}: line 2: image 1 (pics/bad.{suffix}): " + problem.format(image=image) in message


def test_a_bad_image_in_parquet_bytes_names_the_row(tmp_path) -> None:
    path = tmp_path / "eval.parquet"
    _write_parquet(path, [{"prompt": "p", "response": "#### 1", "image": b"\x89PNG\r\n\x1a\nnot really"}])
    assert f"{path}: row 1: image: not a readable image" in _load_error(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "What is <|image_pad|> here?", "response": "#### 1"}, "column 'prompt' holds the vision token"),
        ({"question": "<|vision_start|>Count.", "answer": "#### 1"}, "column 'question' holds the vision token"),
        ({"prompt": "p", "response": "#### 1", "image": "a.png", "images": ["a.png"]}, "give 'image' or 'images'"),
        ({"prompt": "p", "response": "#### 1", "images": "a.png"}, "column 'images' must be a list of images"),
        ({"prompt": "p", "response": "#### 1", "images": [7]}, "image 1: expected an image path or image bytes"),
        ({"prompt": "p", "response": "#### 1", "image": ""}, "image: expected an image path or image bytes, got an"),
    ],
)
def test_vision_tokens_and_malformed_image_columns(tmp_path, row: dict, message: str) -> None:
    path = tmp_path / "eval.jsonl"
    _write_jsonl(path, [row])
    assert f"{path}: line 1: {message}" in _load_error(path)
