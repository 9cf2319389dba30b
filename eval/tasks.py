"""Verifiable tasks: seeded generators, answer extraction, exact-match scoring and `datasets` storage.

Every record is a dict with the keys of `COLUMNS`: `id` (`<task>-<sha1(key)[:12]>`, see `record_key`), `task`,
`prompt` (the raw question; the chat format, image tokens included, is applied elsewhere), `response` (the
reference text the model learns to produce, always ending in `#### <answer>`) and `answer` (the final answer
string that scoring compares). A record with images (Dimple's prompts: `colour_digits`, user rows with images)
has one more key, `images`: a non-empty list of PIL images, each checked by `teachers.vision.check_image`, in the
order the prompt shows them. A text record has no `images` key; readers take `record.get("images") or []`.

Stored (`records_to_dataset`), a dataset has an `images` column only when its source carries images: a list of
`datasets.Image()`, PNG bytes in Arrow (TIFF for the modes PNG cannot hold), and text rows of such a dataset read
back as `[]`. Text-only datasets keep exactly the five string columns. Indexing and iterating a stored dataset
give PIL images back; `Dataset.to_list()` does not decode (it gives `{"bytes", "path"}` dicts), so records are
read with `list(dataset)` or `dataset[i]`.

Response formats are deliberately short, because a tiny character-level model trains on them on CPU (with the
default task configs every response but `chain_arithmetic`'s and `colour_digits`'s is at most 31 characters, so
response + EOS fits a 32-token canvas):

- `addition`: prompt `347+285=`, response `C:0110 #### 0632`, answer `632`. Everything is fixed-width so that
  every column sits at a fixed offset (a tiny model then learns the digit alignment quickly instead of having to
  count): operands are written with leading zeros to the task's `max_digits` (`5+7=` is `005+007=` when
  max_digits is 3) and the sum to max_digits + 1 digits (scoring ignores leading zeros, see `extract_answer`).
  The scratchpad after `C:` is the carry *into* each column of the sum, ones column first, for max_digits + 1
  columns (for 347+285 the carries into the ones, tens, hundreds and thousands columns are 0, 1, 1, 0); written
  in that order, each carry follows from the digits and the carry before it. More, with max_digits 3:
  `005+007=` -> `C:0100 #### 0012`, `099+001=` -> `C:0110 #### 0100`, `000+000=` -> `C:0000 #### 0000`.
  Each operand's digit count is uniform in min_digits..max_digits (its value has no leading zeros, 0 is `0`).
- `addends`: prompt `0632=?+?`, response `#### 0347+0285`, answer `632`: write the number as a sum of two
  non-negative addends; every split is right, so the `answer` column holds the number and scoring checks the sum
  (`is_correct` with the task name). Number and addends are written with max_digits digits; the number has
  min_digits..max_digits digits. Reference splits have no carries: each digit of the first addend is, with
  probability `even_split` (default 1/4), half the number's digit in that column (rounded down), otherwise uniform
  in 0..that digit (`0632` -> `0421+0211`); any pair with the right sum scores.
- `word_problems`: prompt `Ann has 5 apples. She buys 3 more. She gives away 2. How many apples does Ann have?`,
  response `5+3=8 8-2=6 #### 6`: one `a op b=c` equation per step (`+`, `-`, `*`), space separated. The start is in
  1..max_value and the count stays within 0..max_value throughout; each add/subtract amount is at most
  max(1, (max_value - 1) // 2) (so 9 for the default 20: one digit, which is what keeps three steps inside 31
  characters); "doubles them" / "triples them" multiply by 2 / 3.
- `chain_arithmetic`: prompt `Ann has 23 apples. She buys 4 bags of 12 apples. She gives away 31. She finds 18 more.
  How many apples does she have?`, response `4 * 12 = 48, 23 + 48 = 71, 71 - 31 = 40, 40 + 18 = 58 #### 58`: the long
  variant (responses of 60-62 characters at the defaults, so it needs a 64-token canvas), one spaced `a op b = c`
  equation per operation joined by `, `, each operand copied from the question or an earlier result. Amounts,
  bag sizes, products and counts stay in min_value..max_value (default 10..99: two digits each); bag counts are
  2..9.
- `sorting`: prompt `sort 5 3 9 1`, response `#### 1 3 5 9`, answer `1 3 5 9` (ascending, duplicates kept).
- `colour_digits` (visual): one image of rows x cols 28-px cells, a digit in a palette colour in each
  (`eval/images.py`); prompt `Add the red digits.`, response `red: 3 5 7\n3+5=8\n8+7=15\n#### 15`, answer `15`: the
  asked colour's digits in reading order, then one running sum per line (`red: 4\n#### 4` for a single digit);
  with `fixed_width` every sum has the width of the largest possible one (`3+5=08\n08+7=15\n#### 15`).
  At the defaults (2x3 grid, red and blue, at most 3 asked digits) a response is at most 34 characters, so it
  needs a 40-token canvas.

Train and eval are disjoint by record key (the prompt, and the content hashes of its images: a visual task's
question text repeats): a record belongs to eval iff `int(sha1(key), 16) % 10 == 0`, so a split is filled by
walking one seeded stream of candidates and keeping the unique keys that hash into it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Image,
    List,
    Value,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    load_from_disk,
)

from distill.recipe import (
    AddendsTask,
    AdditionTask,
    ChainArithmeticTask,
    ColourDigitsTask,
    DataConfig,
    FileSource,
    SortingTask,
    WordProblemsTask,
)
from eval.images import digit_grid
from teachers.vision import check_image, image_sha256

TaskConfig = AdditionTask | AddendsTask | WordProblemsTask | ChainArithmeticTask | SortingTask | ColourDigitsTask

COLUMNS = ("id", "task", "prompt", "response", "answer")
FEATURES = Features({column: Value("string") for column in COLUMNS})
IMAGES = "images"  # the column (and record key) of a record's images, present only where there are images
IMAGE_FEATURES = Features({**FEATURES, IMAGES: List(Image())})
IMAGE_TASKS = ("colour_digits",)  # built-in tasks whose records carry images
SPLITS = ("train", "eval")
ANSWER_MARKER = "####"
FINGERPRINT_FILE = "fewstep_data.json"
# Bump when a generator or the record schema changes, so datasets cached on disk are rebuilt rather than reused.
DATA_FORMAT_VERSION = 3

# One draw in ten lands in eval, so filling eval needs ~10x its size in draws; the slack on top lets a small but
# sufficient problem space be collected completely (coupon collector) before we declare it too small.
_DRAWS_PER_RECORD = 50
_MIN_DRAWS = 10_000


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring


def _normalise(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.strip())
    text = " ".join(text.split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    # Leading zeros of a whole number carry no value (`0632` is 632); a lone 0 and decimals like 0.5 are kept.
    return re.sub(r"(?<![\w.])0+(?=\d)", "", text)


def extract_answer(text: str) -> str | None:
    """The normalised text after the last `####`, or None when there is no marker.

    Normalising strips the ends, removes thousands separators (`1,234` -> `1234`), collapses runs of whitespace to
    one space, drops one trailing period and strips leading zeros of numbers, so `#### 1,234.`, `####1234` and
    `#### 01234` all give `1234`.
    """
    head, marker, tail = text.rpartition(ANSWER_MARKER)
    if not marker:
        return None
    return _normalise(tail)


def is_correct(output: str, answer: str, task: str | None = None) -> bool:
    """Whether `output` answers right: exact match of its extracted answer with the normalised reference `answer`,
    except for the `addends` task, whose answer `a+b` is right when a + b equals the reference number.

    An empty reference (a user record whose response has no `####`) can never be matched: it cannot be verified.
    """
    expected = _normalise(answer)
    if not expected:
        return False
    extracted = extract_answer(output)
    if task == "addends":
        match = re.fullmatch(r"(\d+)\+(\d+)", extracted or "")
        return match is not None and expected.isdigit() and int(match[1]) + int(match[2]) == int(expected)
    return extracted == expected


# ----------------------------------------------------------------------------------------------------------------
# Records


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def record_key(prompt: str, images: list | tuple = ()) -> str:
    """What names a record's question: its prompt, then its images' content hashes one per line (the prompt alone
    for a text record). Ids, dedupe and the train/eval split use it."""
    return "\n".join([prompt, *(image_sha256(image) for image in images)])


def make_record(
    task: str, prompt: str, response: str, answer: str, record_id: str | None = None, images: list | tuple = ()
) -> dict:
    """A record with the keys of `COLUMNS`, plus `images` when there are any; the id defaults to
    `<task>-<sha1(record_key(prompt, images))[:12]>`."""
    record = {
        "id": record_id or f"{task}-{_sha1(record_key(prompt, images))[:12]}",
        "task": task,
        "prompt": prompt,
        "response": response,
        "answer": answer,
    }
    if images:
        record[IMAGES] = list(images)
    return record


def records_to_dataset(records: list[dict], images: bool = False) -> Dataset:
    """A `Dataset` with the record schema (five string columns); an empty list gives an empty dataset. With
    `images`, or when a record carries images, it also has the `images` column (text rows hold `[]`)."""
    columns = {column: [record[column] for record in records] for column in COLUMNS}
    if not (images or any(record.get(IMAGES) for record in records)):
        return Dataset.from_dict(columns, features=FEATURES)
    columns[IMAGES] = [[_stored_image(image) for image in record.get(IMAGES) or ()] for record in records]
    return Dataset.from_dict(columns, features=IMAGE_FEATURES)


# The modes neither PNG nor TIFF can hold, stored as the plain mode they stand for (premultiplied alpha; padding).
_STORED_MODES = {"La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}


def _stored_image(image) -> dict:
    # Encoded here rather than by `datasets`, which keeps a file's path instead of its pixels and re-encodes a
    # JPEG as JPEG (lossy): PNG is lossless, so a stored image has the `image_sha256` it had in memory.
    if image.mode in _STORED_MODES:
        image = image.convert(_STORED_MODES[image.mode])
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if image.mode in ("PA", "CMYK", "YCbCr") else "PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def split_of(key: str) -> str:
    """The split a record key (`record_key`; a text record's is its prompt) belongs to: `eval` for one hash in
    ten, else `train`."""
    return "eval" if int(_sha1(key), 16) % 10 == 0 else "train"


# ----------------------------------------------------------------------------------------------------------------
# Generators: each draws one (prompt, response, answer) from the seeded stream


def _draw_operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def addition_example(a: int, b: int, width: int) -> tuple[str, str, str]:
    """The prompt, response and answer of `a+b=` with `width`-digit operands, in the module docstring's format."""
    if a < 0 or b < 0 or max(len(str(a)), len(str(b))) > width:
        raise ValueError(f"addition: operands {a} and {b} do not fit {width} digits")
    carries = [0]  # nothing carries into the ones column
    for column in range(width):
        column_sum = (a // 10**column) % 10 + (b // 10**column) % 10 + carries[-1]
        carries.append(column_sum // 10)
    scratchpad = "".join(str(carry) for carry in carries)
    return f"{a:0{width}d}+{b:0{width}d}=", f"C:{scratchpad} {ANSWER_MARKER} {a + b:0{width + 1}d}", str(a + b)


def _draw_addition(config: AdditionTask, rng: random.Random) -> tuple[str, str, str]:
    a = _draw_operand(rng, config.min_digits, config.max_digits)
    b = _draw_operand(rng, config.min_digits, config.max_digits)
    return addition_example(a, b, config.max_digits)


def _draw_addends(config: AddendsTask, rng: random.Random) -> tuple[str, str, str]:
    width = config.max_digits
    number = _draw_operand(rng, config.min_digits, width)
    # A split without carries, drawn column by column: each digit pair is independent of the other columns, so
    # the task is only as hard as keeping the two digits of a column consistent. With even_split > 0 the even
    # split is the dominant answer among many, as in text: a greedy decoder has a mode to find while no single
    # split is likely enough to be committed confidently.
    first = 0
    for column in range(width):
        digit = (number // 10**column) % 10
        first += (digit // 2 if rng.random() < config.even_split else rng.randint(0, digit)) * 10**column
    response = f"{ANSWER_MARKER} {first:0{width}d}+{number - first:0{width}d}"
    return f"{number:0{width}d}=?+?", response, str(number)


_PEOPLE = (
    ("Ann", "She"),
    ("Ben", "He"),
    ("Cara", "She"),
    ("Dan", "He"),
    ("Eve", "She"),
    ("Finn", "He"),
    ("Gus", "He"),
    ("Hana", "She"),
    ("Ivy", "She"),
    ("Joe", "He"),
    ("Kim", "She"),
    ("Leo", "He"),
)
_OBJECTS = (
    ("apple", "apples"),
    ("pen", "pens"),
    ("card", "cards"),
    ("marble", "marbles"),
    ("shell", "shells"),
    ("coin", "coins"),
    ("book", "books"),
    ("egg", "eggs"),
)
_ADD_PHRASES = ("buys {} more", "finds {} more", "gets {} more")
_SUBTRACT_PHRASES = ("gives away {}", "loses {}", "sells {}")
_MULTIPLY_PHRASES = {2: "doubles them", 3: "triples them"}


def _draw_word_problem(config: WordProblemsTask, rng: random.Random) -> tuple[str, str, str]:
    name, pronoun = rng.choice(_PEOPLE)
    singular, plural = rng.choice(_OBJECTS)
    step_cap = max(1, (config.max_value - 1) // 2)
    total = rng.randint(1, config.max_value)
    sentences = [f"{name} has {total} {singular if total == 1 else plural}."]
    equations = []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        # Only operations that keep the count within 0..max_value are offered; one of add/subtract always fits.
        factors = [factor for factor in _MULTIPLY_PHRASES if total >= 1 and total * factor <= config.max_value]
        operations = (["add"] if total < config.max_value else []) + (["subtract"] if total >= 1 else [])
        operation = rng.choice(operations + (["multiply"] if factors else []))
        if operation == "add":
            amount = rng.randint(1, min(step_cap, config.max_value - total))
            phrase, symbol, result = rng.choice(_ADD_PHRASES).format(amount), "+", total + amount
        elif operation == "subtract":
            amount = rng.randint(1, min(step_cap, total))
            phrase, symbol, result = rng.choice(_SUBTRACT_PHRASES).format(amount), "-", total - amount
        else:
            amount = rng.choice(factors)
            phrase, symbol, result = _MULTIPLY_PHRASES[amount], "*", total * amount
        sentences.append(f"{pronoun} {phrase}.")
        equations.append(f"{total}{symbol}{amount}={result}")
        total = result
    sentences.append(f"How many {plural} does {name} have?")
    answer = str(total)
    return " ".join(sentences), f"{' '.join(equations)} {ANSWER_MARKER} {answer}", answer


def _draw_chain_arithmetic(config: ChainArithmeticTask, rng: random.Random) -> tuple[str, str, str]:
    name, pronoun = rng.choice(_PEOPLE)
    _, plural = rng.choice(_OBJECTS)
    low, high = config.min_value, config.max_value
    total = rng.randint(low, high)
    start = total
    sentences = [f"{name} has {total} {plural}."]
    equations = []
    units: list[tuple[int, int | None]] = []  # per question operation: (change of the count, bag count or None)
    operations_left = rng.randint(config.min_steps, config.max_steps)
    while operations_left > 0:
        # Only operations that keep every number within low..high are offered; since high >= 3 * low (the schema
        # checks it), an addition or a subtraction of at least low always fits.
        operations = (["add"] if total + low <= high else []) + (["subtract"] if total - low >= low else [])
        if operations_left >= 2 and total + 2 * low <= high:
            operations.append("bags")
        operation = rng.choice(operations)
        if operation == "add":
            amount = rng.randint(low, high - total)
            sentences.append(f"{pronoun} {rng.choice(_ADD_PHRASES).format(amount)}.")
            equations.append(f"{total} + {amount} = {total + amount}")
            units.append((amount, None))
            total, operations_left = total + amount, operations_left - 1
        elif operation == "subtract":
            amount = rng.randint(low, total - low)
            sentences.append(f"{pronoun} {rng.choice(_SUBTRACT_PHRASES).format(amount)}.")
            equations.append(f"{total} - {amount} = {total - amount}")
            units.append((-amount, None))
            total, operations_left = total - amount, operations_left - 1
        else:
            # Bag counts are single digits; the bag size and the product obey the same bounds as every amount.
            bags = rng.randint(2, min(9, (high - total) // low))
            size = rng.randint(low, (high - total) // bags)
            sentences.append(f"{pronoun} buys {bags} bags of {size} {plural}.")
            equations += [f"{bags} * {size} = {bags * size}", f"{total} + {bags * size} = {total + bags * size}"]
            units.append((bags * size, bags))
            total, operations_left = total + bags * size, operations_left - 2
    sentences.append(f"How many {plural} does {pronoun.lower()} have?")
    if config.step_order == "shuffled":
        equations = _shuffled_steps(start, units, low, high, rng)
    answer = str(total)
    return " ".join(sentences), f"{', '.join(equations)} {ANSWER_MARKER} {answer}", answer


def _shuffled_steps(
    start: int, units: list[tuple[int, int | None]], low: int, high: int, rng: random.Random
) -> list[str]:
    """The equations of the question's operations (`units`: change of the count, bag count for a bag purchase)
    in an order drawn uniformly among those whose running counts all stay in low..high (the question's order
    always does)."""
    orders = []
    for order in itertools.permutations(range(len(units))):
        counts = list(itertools.accumulate((units[index][0] for index in order), initial=start))
        if all(low <= count <= high for count in counts):
            orders.append(order)
    equations, total = [], start
    for index in rng.choice(orders):
        change, bags = units[index]
        if bags is not None:
            equations += [f"{bags} * {change // bags} = {change}", f"{total} + {change} = {total + change}"]
        else:
            equations.append(f"{total} {'+' if change > 0 else '-'} {abs(change)} = {total + change}")
        total += change
    return equations


def _draw_sorting(config: SortingTask, rng: random.Random) -> tuple[str, str, str]:
    values = [rng.randint(0, config.max_value) for _ in range(rng.randint(config.min_length, config.max_length))]
    answer = " ".join(str(value) for value in sorted(values))
    return "sort " + " ".join(str(value) for value in values), f"{ANSWER_MARKER} {answer}", answer


def _draw_colour_digits(config: ColourDigitsTask, rng: random.Random) -> tuple[str, str, str, list]:
    cells = config.rows * config.cols
    asked = rng.choice(config.colours)
    others = [colour for colour in config.colours if colour != asked]
    # The asked colour's count is drawn first (not left to per-cell draws) so that every grid has at least one of
    # its digits and no more than max_asked, which bounds the response's length.
    asked_cells = set(rng.sample(range(cells), rng.randint(config.min_asked, config.max_asked)))
    colours = [asked if cell in asked_cells else rng.choice(others) for cell in range(cells)]
    digits = [rng.randint(0, 9) for _ in range(cells)]
    read = [digit for digit, colour in zip(digits, colours, strict=True) if colour == asked]
    width = len(str(9 * config.max_asked)) if config.fixed_width else 1  # digits of the largest possible sum

    def number(value: int) -> str:
        return f"{value:0{width}d}"

    lines = [f"{asked}: {' '.join(map(str, read))}"]
    total = read[0]
    for digit in read[1:]:
        # The first addend is a digit read from the image, written as read; running sums are padded.
        lines.append(f"{total if len(lines) == 1 else number(total)}+{digit}={number(total + digit)}")
        total += digit
    lines.append(f"{ANSWER_MARKER} {number(total)}")
    image = check_image(digit_grid(digits, colours, config.cols), config.name)  # as every image entering fewstep
    return f"Add the {asked} digits.", "\n".join(lines), str(total), [image]


# Each returns (prompt, response, answer), and a visual task's also the prompt's images.
_GENERATORS: dict[str, Callable[..., tuple]] = {
    "addition": _draw_addition,
    "addends": _draw_addends,
    "word_problems": _draw_word_problem,
    "chain_arithmetic": _draw_chain_arithmetic,
    "sorting": _draw_sorting,
    "colour_digits": _draw_colour_digits,
}


def generate(task_config: TaskConfig, split: str, seed: int) -> list[dict]:
    """`train_size` (split `train`) or `eval_size` (split `eval`) unique records of a built-in task.

    Candidates come from `random.Random(seed)`; those whose key (`record_key`: the prompt and its images) hashes
    into the other split or repeats one already kept are skipped, so the same seed gives identical records and
    train and eval never share a question.
    Raises ValueError when the task's problem space cannot fill the split within a bounded number of draws.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (expected one of: {', '.join(SPLITS)})")
    draw = _GENERATORS.get(task_config.name)
    if draw is None:
        raise ValueError(f"unknown task '{task_config.name}' (built-in tasks: {', '.join(_GENERATORS)})")
    size = task_config.train_size if split == "train" else task_config.eval_size
    rng = random.Random(seed)
    max_draws = _DRAWS_PER_RECORD * size + _MIN_DRAWS
    records: list[dict] = []
    seen: set[str] = set()
    draws = 0
    while len(records) < size:
        if draws == max_draws:
            raise ValueError(
                f"{task_config.name}: found only {len(records)} distinct {split} prompts of the {size} requested "
                f"(train_size={task_config.train_size}, eval_size={task_config.eval_size}) in {draws} draws; "
                f"the problem space is too small, widen the task's ranges or lower the sizes"
            )
        draws += 1
        prompt, response, answer, *drawn_images = draw(task_config, rng)
        images = drawn_images[0] if drawn_images else []
        key = record_key(prompt, images)
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        records.append(make_record(task_config.name, prompt, response, answer, images=images))
    return records


# ----------------------------------------------------------------------------------------------------------------
# Storage as `datasets` on disk, reused when the fingerprint matches


def _task_seed(seed: int, name: str) -> int:
    # Each task gets its own stream, so adding or reordering tasks never changes another task's records.
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:16], 16)


def _file_digest(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None  # load_file_source reports the missing file with its own message
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(source: TaskConfig | FileSource, seed: int) -> str:
    payload: dict = {"config": source.model_dump(mode="json"), "seed": seed, "version": DATA_FORMAT_VERSION}
    if isinstance(source, FileSource):
        # Imported here because userdata imports this module for the record schema and answer extraction.
        from eval.userdata import image_files

        # The config names the files, not their contents; an edited file must not be served from a stale copy.
        payload["contents"] = [_file_digest(source.train_path), _file_digest(source.eval_path)]
        # Nor an edited image a row names by path. Absent for text-only files, so their fingerprints are as before.
        if (images := image_files(source)) is not None:
            payload["images"] = [_file_digest(path) for path in images]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _stored_metadata(task_dir: Path) -> dict:
    try:
        metadata = json.loads((task_dir / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    # A directory whose metadata names another task is a staging copy left by an interrupted build.
    return metadata if isinstance(metadata, dict) and metadata.get("task") == task_dir.name else {}


def _save_atomically(dataset: DatasetDict, task_dir: Path, metadata: dict) -> None:
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=task_dir.parent, prefix=f".{task_dir.name}.tmp-"))
    try:
        # One shard per split even when empty: `datasets` writes no shard for an empty split at the default
        # sharding and then cannot load it back. The shard-writing progress bars are noise at these sizes.
        bars_were_on = not are_progress_bars_disabled()
        disable_progress_bars()
        try:
            dataset.save_to_disk(str(staging), num_shards=dict.fromkeys(dataset, 1))
        finally:
            if bars_were_on:
                enable_progress_bars()
        # Written last: a directory with a fingerprint is always complete.
        (staging / FINGERPRINT_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        if task_dir.exists():
            stale = Path(tempfile.mkdtemp(dir=task_dir.parent, prefix=f".{task_dir.name}.old-"))
            os.replace(task_dir, stale / task_dir.name)
            shutil.rmtree(stale)
        os.replace(staging, task_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_task_datasets(data_config: DataConfig, seed: int, out_dir: Path) -> dict[str, DatasetDict]:
    """Every task of `data_config` as a `DatasetDict` with `train` and `eval`; writes nothing.

    Built-in tasks are generated with a seed mixed from `seed` and the task name; file sources are read with
    `eval.userdata.load_file_source`. A task stored under `out_dir/<task name>` whose `fewstep_data.json`
    fingerprint (its config, the seed and, for files, their contents) matches is loaded instead. Every source is
    read before anything is written, so a bad file (ValueError naming it) leaves `out_dir` as it was.
    """
    # Imported here because userdata imports this module for the record schema and answer extraction.
    from eval.userdata import load_file_source

    out_dir = Path(out_dir)
    datasets: dict[str, DatasetDict] = {}
    for source in [*data_config.tasks, *data_config.files]:
        if source.name in (".", ".."):
            raise ValueError(f"task name '{source.name}' cannot be used as a directory name under {out_dir}")
        task_dir = out_dir / source.name
        if _stored_metadata(task_dir).get("fingerprint") == _fingerprint(source, seed):
            datasets[source.name] = load_from_disk(str(task_dir))
        elif isinstance(source, FileSource):
            datasets[source.name] = load_file_source(source)
        else:
            task_seed = _task_seed(seed, source.name)
            images = source.name in IMAGE_TASKS  # an empty split keeps the image column too
            splits = {split: records_to_dataset(generate(source, split, task_seed), images) for split in SPLITS}
            datasets[source.name] = DatasetDict(splits)
    return datasets


def write_task_datasets(datasets: dict[str, DatasetDict], data_config: DataConfig, seed: int, out_dir: Path) -> None:
    """Save each task of `datasets` (from `read_task_datasets`) to `out_dir/<task name>`, written to a temporary
    directory and renamed into place with its fingerprint; a directory whose fingerprint already matches is kept."""
    out_dir = Path(out_dir)
    for source in [*data_config.tasks, *data_config.files]:
        task_dir = out_dir / source.name
        fingerprint = _fingerprint(source, seed)
        if _stored_metadata(task_dir).get("fingerprint") == fingerprint:
            continue
        dataset = datasets[source.name]
        metadata = {
            "fingerprint": fingerprint,
            "task": source.name,
            "seed": seed,
            "version": DATA_FORMAT_VERSION,
            "sizes": {split: len(dataset[split]) for split in SPLITS},
        }
        _save_atomically(dataset, task_dir, metadata)


def build_task_datasets(data_config: DataConfig, seed: int, out_dir: Path) -> dict[str, DatasetDict]:
    """`read_task_datasets`, then `write_task_datasets`: every task generated or read (or reused from disk) and
    saved under `out_dir/<task name>`; nothing is written when a source cannot be read."""
    datasets = read_task_datasets(data_config, seed, out_dir)
    write_task_datasets(datasets, data_config, seed, out_dir)
    return datasets


def load_task_datasets(out_dir: Path) -> dict[str, DatasetDict]:
    """Reload every task saved by `build_task_datasets` under `out_dir`, keyed by task name (sorted)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no task datasets at {out_dir}: directory does not exist")
    task_dirs = sorted(path for path in out_dir.iterdir() if _stored_metadata(path))
    return {task_dir.name: load_from_disk(str(task_dir)) for task_dir in task_dirs}
