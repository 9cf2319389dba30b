"""Pins the built-in task formats, re-derives every generated record independently, and checks storage."""

import hashlib
import json
import re
from typing import get_args

import pyarrow
import pyarrow.parquet
import pytest
from PIL import Image

from distill.recipe import (
    BUILTIN_TASKS,
    AddendsTask,
    AdditionTask,
    ChainArithmeticTask,
    Colour,
    ColourDigitsTask,
    DataConfig,
    FileSource,
    SortingTask,
    WordProblemsTask,
)
from eval import images, tasks
from eval.tasks import (
    COLUMNS,
    FINGERPRINT_FILE,
    addition_example,
    build_task_datasets,
    extract_answer,
    generate,
    is_correct,
    load_task_datasets,
)
from teachers.vision import IMAGE_MODES, image_sha256
from tests.bad_images import png_bytes

SAMPLES = 400


def _is_eval_prompt(prompt: str) -> bool:
    return int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 10 == 0


def _carries(a: int, b: int, width: int) -> str:
    # A carry reaches column i exactly when the low i digits of a and b overflow 10**i; ones column first.
    modulus = [10**i for i in range(width + 1)]
    return "".join(str(int(a % modulus[i] + b % modulus[i] >= modulus[i])) for i in range(width + 1))


def _check_common(record: dict, task: str) -> None:
    assert tuple(record) == COLUMNS
    assert record["task"] == task
    assert record["id"] == f"{task}-{hashlib.sha1(record['prompt'].encode()).hexdigest()[:12]}"
    assert re.fullmatch(r".*#### \S+( \S+)*", record["response"])
    assert extract_answer(record["response"]) == record["answer"]
    assert is_correct(record["response"], record["answer"])


# ----------------------------------------------------------------------------------------------------------------
# Exact formats on hand-worked examples


@pytest.mark.parametrize(
    ("a", "b", "width", "prompt", "response", "answer"),
    [
        (347, 285, 3, "347+285=", "C:0110 #### 0632", "632"),
        (5, 7, 1, "5+7=", "C:01 #### 12", "12"),
        (5, 7, 3, "005+007=", "C:0100 #### 0012", "12"),
        (99, 1, 2, "99+01=", "C:011 #### 100", "100"),
        (99, 1, 3, "099+001=", "C:0110 #### 0100", "100"),
        (0, 0, 3, "000+000=", "C:0000 #### 0000", "0"),
        (57, 68, 2, "57+68=", "C:011 #### 125", "125"),
        (999, 999, 3, "999+999=", "C:0111 #### 1998", "1998"),
        (1, 999, 3, "001+999=", "C:0111 #### 1000", "1000"),
        (120, 3, 3, "120+003=", "C:0000 #### 0123", "123"),
        (4567, 5433, 4, "4567+5433=", "C:01111 #### 10000", "10000"),
    ],
)
def test_addition_format_on_hand_examples(a: int, b: int, width: int, prompt: str, response: str, answer: str) -> None:
    assert addition_example(a, b, width) == (prompt, response, answer)
    assert is_correct(response, answer)


def test_addition_operand_wider_than_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="do not fit 2 digits"):
        addition_example(100, 5, 2)


def test_word_problem_and_sorting_formats() -> None:
    word = generate(WordProblemsTask(name="word_problems", train_size=5, eval_size=0), "train", seed=3)[0]
    assert re.fullmatch(r"[A-Z][a-z]+ has \d+ [a-z]+\. .+ How many [a-z]+ does [A-Z][a-z]+ have\?", word["prompt"])
    assert re.fullmatch(r"(\d+[-+*]\d+=\d+ )+#### \d+", word["response"])
    sort = generate(SortingTask(name="sorting", train_size=5, eval_size=0), "train", seed=3)[0]
    assert re.fullmatch(r"sort \d+( \d+)+", sort["prompt"])
    assert sort["response"] == f"#### {sort['answer']}"


# ----------------------------------------------------------------------------------------------------------------
# Every generated record re-derived from its prompt


def test_addition_records_are_correct() -> None:
    config = AdditionTask(name="addition", train_size=SAMPLES, eval_size=40, min_digits=1, max_digits=4)
    records = generate(config, "train", seed=1) + generate(config, "eval", seed=1)
    digit_counts = set()
    for record in records:
        _check_common(record, "addition")
        left, right = re.fullmatch(r"(\d{4})\+(\d{4})=", record["prompt"]).groups()
        a, b = int(left), int(right)
        digit_counts.update((len(str(a)), len(str(b))))
        assert record["answer"] == str(a + b)
        assert record["response"] == f"C:{_carries(a, b, 4)} #### {a + b:05d}"
    assert digit_counts == {1, 2, 3, 4}


def _replay_word_problem(prompt: str) -> tuple[list[str], int]:
    sentences = re.findall(r"[^.?]+[.?]", prompt)
    start = re.fullmatch(r"([A-Z][a-z]+) has (\d+) ([a-z]+)\.", sentences[0])
    name, total, noun = start.group(1), int(start.group(2)), start.group(3)
    assert noun.endswith("s") == (total != 1)
    question = re.fullmatch(r" How many ([a-z]+) does ([A-Z][a-z]+) have\?", sentences[-1])
    assert question.group(2) == name and question.group(1).rstrip("s") == noun.rstrip("s")
    equations = []
    for sentence in sentences[1:-1]:
        pronoun, action = re.fullmatch(r" (She|He) (.+)\.", sentence).groups()
        assert pronoun in ("She", "He")
        if match := re.fullmatch(r"(?:buys|finds|gets) (\d+) more", action):
            amount = int(match.group(1))
            equations.append(f"{total}+{amount}={total + amount}")
            total += amount
        elif match := re.fullmatch(r"(?:gives away|loses|sells) (\d+)", action):
            amount = int(match.group(1))
            equations.append(f"{total}-{amount}={total - amount}")
            total -= amount
        else:
            factor = {"doubles them": 2, "triples them": 3}[action]
            equations.append(f"{total}*{factor}={total * factor}")
            total *= factor
    return equations, total


def test_word_problem_records_are_correct() -> None:
    config = WordProblemsTask(name="word_problems", train_size=SAMPLES, eval_size=40)
    records = generate(config, "train", seed=2) + generate(config, "eval", seed=2)
    operators = set()
    for record in records:
        _check_common(record, "word_problems")
        equations, total = _replay_word_problem(record["prompt"])
        assert config.min_steps <= len(equations) <= config.max_steps
        assert record["response"] == f"{' '.join(equations)} #### {total}"
        assert record["answer"] == str(total)
        for equation in equations:
            a, operator, b, c = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", equation).groups()
            operators.add(operator)
            assert 0 <= int(c) <= config.max_value and int(a) <= config.max_value
    assert operators == {"+", "-", "*"}


def test_sorting_records_are_correct() -> None:
    config = SortingTask(name="sorting", train_size=SAMPLES, eval_size=40, max_value=30)
    records = generate(config, "train", seed=4) + generate(config, "eval", seed=4)
    for record in records:
        _check_common(record, "sorting")
        values = [int(value) for value in record["prompt"].removeprefix("sort ").split(" ")]
        assert config.min_length <= len(values) <= config.max_length
        assert all(0 <= value <= config.max_value for value in values)
        assert record["answer"] == " ".join(str(value) for value in sorted(values))


def test_default_configs_fit_a_32_token_canvas() -> None:
    # Response + EOS must fit data.max_response_tokens (32) under the character tokenizer.
    configs = [
        AdditionTask(name="addition", train_size=2000),
        WordProblemsTask(name="word_problems", train_size=2000),
        SortingTask(name="sorting", train_size=2000),
    ]
    for config in configs:
        records = generate(config, "train", seed=0)
        assert max(len(record["response"]) for record in records) <= 31
        assert max(len(record["prompt"]) for record in records) <= 110


# ----------------------------------------------------------------------------------------------------------------
# Splits: disjoint, deterministic, bounded


@pytest.mark.parametrize(
    "config",
    [
        AdditionTask(name="addition", train_size=300, eval_size=60, max_digits=2),
        WordProblemsTask(name="word_problems", train_size=300, eval_size=60),
        ChainArithmeticTask(name="chain_arithmetic", train_size=300, eval_size=60),
        SortingTask(name="sorting", train_size=300, eval_size=60),
    ],
    ids=lambda config: config.name,
)
def test_splits_are_disjoint_unique_and_deterministic(config) -> None:
    train, evaluation = generate(config, "train", seed=7), generate(config, "eval", seed=7)
    assert (len(train), len(evaluation)) == (300, 60)
    train_prompts = [record["prompt"] for record in train]
    eval_prompts = [record["prompt"] for record in evaluation]
    assert len(set(train_prompts)) == 300 and len(set(eval_prompts)) == 60
    assert not set(train_prompts) & set(eval_prompts)
    assert not any(_is_eval_prompt(prompt) for prompt in train_prompts)
    assert all(_is_eval_prompt(prompt) for prompt in eval_prompts)
    assert generate(config, "train", seed=7) == train
    assert generate(config, "eval", seed=7) == evaluation
    assert generate(config, "train", seed=8) != train
    # A split depends only on its own size, so resizing eval never reshuffles train.
    assert generate(config.model_copy(update={"eval_size": 5}), "train", seed=7) == train


def test_a_small_problem_space_fills_completely_then_errors() -> None:
    space = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    available = sum(not _is_eval_prompt(prompt) for prompt in space)
    exact = AdditionTask(name="addition", train_size=available, eval_size=0, max_digits=1)
    assert sorted(record["prompt"] for record in generate(exact, "train", seed=0)) == sorted(
        prompt for prompt in space if not _is_eval_prompt(prompt)
    )
    too_many = exact.model_copy(update={"train_size": available + 1})
    with pytest.raises(ValueError, match=rf"^addition: .*{available + 1} requested") as error:
        generate(too_many, "train", seed=0)
    assert "\n" not in str(error.value)


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        generate(SortingTask(name="sorting"), "test", seed=0)


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no marker here", None),
        ("", None),
        ("5+3=8 #### 8", "8"),
        ("####8", "8"),
        ("####", ""),
        ("#### 1 #### 2", "2"),
        ("reasoning\n####   1,234,567.  ", "1234567"),
        ("#### 12,34", "12,34"),
        ("#### 1,2345", "1,2345"),
        ("#### 3.50", "3.50"),
        ("#### 1  3\t5\n9", "1 3 5 9"),
        ("#### 7 .", "7"),
        ("#### 7..", "7."),
        ("#### 0632", "632"),
        ("#### 0000", "0"),
        ("#### 0", "0"),
        ("#### 0.5", "0.5"),
        ("#### 100 0 05", "100 0 5"),
        ("#### x007", "x007"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("output", "answer", "correct"),
    [
        ("C:0110 #### 632", "632", True),
        ("#### 1,000.", "1000", True),
        ("#### 1 3  5", " 1 3 5 ", True),
        ("632", "632", False),
        ("#### 0632", "632", True),
        ("#### 632", "0632", True),
        ("#### 0 1 3", "0 1 3", True),
        ("#### 0.50", "0.5", False),
        ("#### 63", "632", False),
        ("#### 632 apples", "632", False),
        ("####", "", False),
    ],
)
def test_is_correct(output: str, answer: str, correct: bool) -> None:
    assert is_correct(output, answer) is correct


# ----------------------------------------------------------------------------------------------------------------
# Storage


def _data_config(tmp_path) -> DataConfig:
    user_file = tmp_path / "user.jsonl"
    user_file.write_text(json.dumps({"prompt": "2+2?", "response": "#### 4"}) + "\n")
    return DataConfig(
        tasks=[
            AdditionTask(name="addition", train_size=40, eval_size=8),
            SortingTask(name="sorting", train_size=30, eval_size=0),
        ],
        files=[FileSource(name="mine", train_path=user_file)],
    )


def _as_lists(datasets: dict) -> dict:
    return {name: {split: data[split].to_list() for split in data} for name, data in datasets.items()}


def test_build_saves_and_reloads(tmp_path) -> None:
    out_dir = tmp_path / "data"
    built = build_task_datasets(_data_config(tmp_path), seed=5, out_dir=out_dir)
    assert list(built) == ["addition", "sorting", "mine"]
    for data in built.values():
        assert list(data) == ["train", "eval"]
        assert all(data[split].column_names == list(COLUMNS) for split in data)
    assert (len(built["addition"]["train"]), len(built["addition"]["eval"])) == (40, 8)
    assert len(built["sorting"]["eval"]) == 0
    assert built["mine"]["train"].to_list() == [
        {"id": built["mine"]["train"][0]["id"], "task": "mine", "prompt": "2+2?", "response": "#### 4", "answer": "4"}
    ]
    assert sorted(path.name for path in out_dir.iterdir()) == ["addition", "mine", "sorting"]
    assert json.loads((out_dir / "addition" / FINGERPRINT_FILE).read_text())["sizes"] == {"train": 40, "eval": 8}
    reloaded = load_task_datasets(out_dir)
    assert sorted(reloaded) == ["addition", "mine", "sorting"]
    assert _as_lists(reloaded) == _as_lists(built)


def test_tasks_use_distinct_streams(tmp_path) -> None:
    config = DataConfig(tasks=[SortingTask(name="sorting", train_size=20, eval_size=2)])
    built = build_task_datasets(config, seed=5, out_dir=tmp_path)
    assert built["sorting"]["train"].to_list() != generate(config.tasks[0], "train", seed=5)


def test_matching_fingerprint_is_reused_and_a_change_rebuilds(tmp_path, monkeypatch) -> None:
    out_dir = tmp_path / "data"
    config = _data_config(tmp_path)
    first = _as_lists(build_task_datasets(config, seed=5, out_dir=out_dir))

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated although the fingerprint matched")

    with monkeypatch.context() as patch:
        patch.setattr(tasks, "generate", no_generation)
        patch.setattr("eval.userdata.load_file_source", no_generation)
        assert _as_lists(build_task_datasets(config, seed=5, out_dir=out_dir)) == first

    reseeded = _as_lists(build_task_datasets(config, seed=6, out_dir=out_dir))
    assert reseeded["addition"] != first["addition"]
    assert json.loads((out_dir / "addition" / FINGERPRINT_FILE).read_text())["seed"] == 6

    # Editing a user file changes its fingerprint even though the config is the same.
    config.files[0].train_path.write_text(json.dumps({"prompt": "3+3?", "response": "#### 6"}) + "\n")
    edited = _as_lists(build_task_datasets(config, seed=6, out_dir=out_dir))
    assert edited["mine"]["train"][0]["answer"] == "6"
    assert sorted(path.name for path in out_dir.iterdir()) == ["addition", "mine", "sorting"]


def test_stale_or_unfinished_directories_are_replaced_or_ignored(tmp_path) -> None:
    out_dir = tmp_path / "data"
    (out_dir / "addition").mkdir(parents=True)
    (out_dir / "addition" / "junk.txt").write_text("half-written")
    leftover = out_dir / ".sorting.tmp-crashed"
    leftover.mkdir()
    (leftover / FINGERPRINT_FILE).write_text(json.dumps({"task": "sorting", "fingerprint": "x"}))
    config = DataConfig(tasks=[AdditionTask(name="addition", train_size=10, eval_size=2)])
    build_task_datasets(config, seed=0, out_dir=out_dir)
    assert not (out_dir / "addition" / "junk.txt").exists()
    assert list(load_task_datasets(out_dir)) == ["addition"]


def test_failed_generation_leaves_nothing_behind(tmp_path) -> None:
    config = DataConfig(tasks=[AdditionTask(name="addition", train_size=500, eval_size=5, max_digits=1)])
    with pytest.raises(ValueError, match="too small"):
        build_task_datasets(config, seed=0, out_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_load_from_a_missing_directory_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_datasets(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------------
# addends: many right answers


def test_addends_references_are_fixed_width_carry_free_splits_of_the_number():
    records = generate(AddendsTask(name="addends", train_size=300, eval_size=0), "train", seed=3)
    for record in records:
        match = re.fullmatch(r"(\d{5})=\?\+\?", record["prompt"])
        assert match and int(match[1]) == int(record["answer"])
        first, second = re.fullmatch(r"#### (\d{5})\+(\d{5})", record["response"]).groups()
        assert int(first) + int(second) == int(record["answer"])
        # Column by column: the digits of the two addends add up to the number's digit (no carries).
        assert all(int(a) + int(b) == int(n) for a, b, n in zip(first, second, match[1], strict=True))
        assert is_correct(record["response"], record["answer"], "addends")


def test_addends_even_split_one_gives_the_even_split_and_zero_gives_varied_splits():
    even = generate(AddendsTask(name="addends", train_size=50, eval_size=0, even_split=1.0), "train", seed=0)
    for record in even:
        number = record["prompt"][:5]
        expected = "".join(str(int(digit) // 2) for digit in number)
        assert record["response"].startswith(f"#### {expected}+")
    varied = generate(AddendsTask(name="addends", train_size=200, eval_size=0, even_split=0.0), "train", seed=0)
    evens = sum(r["response"][5:10] == "".join(str(int(d) // 2) for d in r["prompt"][:5]) for r in varied)
    assert evens < len(varied) / 2


@pytest.mark.parametrize(
    ("output", "right"),
    [
        ("#### 00421+00211", True),  # the reference
        ("#### 00632+00000", True),  # any split with the right sum
        ("#### 347+285", True),  # with carries, without leading zeros
        ("#### 00421+00212", False),  # wrong sum
        ("#### 632", False),  # the number itself is not a split
        ("#### 00421-00211", False),
        ("00421+00211", False),  # no answer marker
    ],
)
def test_addends_scoring_accepts_every_split_with_the_right_sum(output, right):
    assert is_correct(output, "632", "addends") is right
    # Without the task name the reference number is compared exactly, as for every other task.
    assert is_correct("#### 632", "632") is True


def test_addends_digit_range_is_validated():
    with pytest.raises(ValueError, match="min_digits"):
        AddendsTask(name="addends", min_digits=4, max_digits=2)
    with pytest.raises(ValueError):
        AddendsTask(name="addends", even_split=1.5)


# ----------------------------------------------------------------------------------------------------------------
# chain_arithmetic: long chains of dependent steps


def _replay_chain(prompt: str) -> tuple[list[str], int, list[int]]:
    # The equations the prompt implies, its final count, and every number written in it (in order).
    sentences = re.findall(r"[^.?]+[.?]", prompt)
    _, total, noun = re.fullmatch(r"([A-Z][a-z]+) has (\d+) ([a-z]+s)\.", sentences[0]).groups()
    total = int(total)
    pronouns = set()
    equations = []
    for sentence in sentences[1:-1]:
        pronoun, action = re.fullmatch(r" (She|He) (.+)\.", sentence).groups()
        pronouns.add(pronoun)
        if match := re.fullmatch(r"(?:buys|finds|gets) (\d+) more", action):
            amount = int(match.group(1))
            equations.append(f"{total} + {amount} = {total + amount}")
            total += amount
        elif match := re.fullmatch(r"(?:gives away|loses|sells) (\d+)", action):
            amount = int(match.group(1))
            equations.append(f"{total} - {amount} = {total - amount}")
            total -= amount
        else:
            bags, size = (int(value) for value in re.fullmatch(rf"buys (\d) bags of (\d+) {noun}", action).groups())
            equations += [f"{bags} * {size} = {bags * size}", f"{total} + {bags * size} = {total + bags * size}"]
            total += bags * size
    assert len(pronouns) == 1 and sentences[-1] == f" How many {noun} does {pronouns.pop().lower()} have?"
    return equations, total, [int(value) for value in re.findall(r"\d+", prompt)]


def test_chain_arithmetic_format_on_a_hand_example() -> None:
    prompt = (
        "Ann has 23 apples. She buys 4 bags of 12 apples. She gives away 31. She finds 18 more. "
        "How many apples does she have?"
    )
    equations, total, _ = _replay_chain(prompt)
    assert f"{', '.join(equations)} #### {total}" == "4 * 12 = 48, 23 + 48 = 71, 71 - 31 = 40, 40 + 18 = 58 #### 58"
    record = generate(ChainArithmeticTask(name="chain_arithmetic", train_size=5, eval_size=0), "train", seed=3)[0]
    assert re.fullmatch(r"[A-Z][a-z]+ has \d+ [a-z]+\. .+ How many [a-z]+ does (she|he) have\?", record["prompt"])
    assert re.fullmatch(r"\d+ [-+*] \d+ = \d+(, \d+ [-+*] \d+ = \d+)* #### \d+", record["response"])


def _check_chain(record: dict, config: ChainArithmeticTask) -> tuple[int, set[str]]:
    """Re-derive a record from its prompt and check every step; returns its step count and operators."""
    _check_common(record, "chain_arithmetic")
    equations, total, quantities = _replay_chain(record["prompt"])
    assert record["response"] == f"{', '.join(equations)} #### {total}" and record["answer"] == str(total)
    assert all(2 <= value <= 9 or config.min_value <= value <= config.max_value for value in quantities)
    results: list[int] = []
    operators = set()
    for equation in equations:
        a, operator, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", equation).groups()
        a, b, c = int(a), int(b), int(c)
        operators.add(operator)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[operator]
        assert config.min_value <= c <= config.max_value
        # The first step copies both numbers from the question; later ones copy them or reuse an earlier result.
        assert all(value in quantities or value in results for value in (a, b))
        if not results:
            assert a in quantities and b in quantities
        results.append(c)
    assert results[-1] == total
    assert config.min_steps <= len(equations) <= config.max_steps
    return len(equations), operators


def test_chain_arithmetic_records_are_correct_and_long() -> None:
    config = ChainArithmeticTask(name="chain_arithmetic", train_size=SAMPLES, eval_size=40)
    records = generate(config, "train", seed=2) + generate(config, "eval", seed=2)
    operators = set()
    for record in records:
        operators |= _check_chain(record, config)[1]
        # At least 48 tokens (characters) of intermediate steps, and response + EOS within a 64-token canvas.
        assert len(record["response"].partition(" #### ")[0]) >= 48 and len(record["response"]) <= 63
    assert operators == {"+", "-", "*"}


def test_chain_arithmetic_knobs_bound_steps_and_values() -> None:
    # The tightest ranges the schema allows (max_value = 3 * min_value) still fill every chain, 2 to 6 steps long.
    config = ChainArithmeticTask(
        name="chain_arithmetic", train_size=300, eval_size=0, min_steps=2, max_steps=6, min_value=4, max_value=12
    )
    step_counts = {_check_chain(record, config)[0] for record in generate(config, "train", seed=5)}
    assert step_counts == {2, 3, 4, 5, 6}


def _steps_of(equations: list[str]) -> list[tuple[str, ...]]:
    """The question operations equations stand for, in order: `("+", n)`, `("-", n)` or `("bags", k, m)`."""
    steps, pending = [], None
    for equation in equations:
        a, operator, b, _ = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", equation).groups()
        if operator == "*":
            pending = ("bags", a, b)
        elif pending is not None:  # the addition of a bag purchase's product follows its product
            steps.append(pending)
            pending = None
        else:
            steps.append((operator, b))
    return steps


def test_shuffled_chain_arithmetic_writes_the_questions_operations_in_some_valid_order() -> None:
    config = ChainArithmeticTask(
        name="chain_arithmetic",
        train_size=300,
        eval_size=0,
        min_steps=4,
        max_steps=4,
        max_value=30,
        step_order="shuffled",
    )
    reordered = 0
    for record in generate(config, "train", seed=4):
        _check_common(record, "chain_arithmetic")
        in_question, total, quantities = _replay_chain(record["prompt"])
        written = record["response"].partition(" #### ")[0].split(", ")
        assert sorted(_steps_of(written)) == sorted(_steps_of(in_question)) and record["answer"] == str(total)
        count = quantities[0]
        for equation in written:
            a, operator, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", equation).groups()
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[operator]
            if operator != "*":  # the running count: each equation continues it, always within range
                assert int(a) == count and config.min_value <= int(c) <= config.max_value
                count = int(c)
        assert count == total and record["response"].endswith(f" #### {total}")
        reordered += written != in_question
    # On 10..30 many orders leave the range, so the question's is often the only one; 135 of 300 differ here.
    assert reordered > 100


def test_chain_arithmetic_is_scored_by_its_answer() -> None:
    record = generate(ChainArithmeticTask(name="chain_arithmetic", train_size=1, eval_size=0), "train", seed=0)[0]
    steps = record["response"].partition(" #### ")[0]
    assert is_correct(record["response"], record["answer"], "chain_arithmetic")
    assert is_correct(f"wrong steps #### {record['answer']}", record["answer"], "chain_arithmetic")
    assert not is_correct(f"{steps} #### {int(record['answer']) + 1}", record["answer"], "chain_arithmetic")
    assert not is_correct(steps, record["answer"], "chain_arithmetic")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"min_steps": 5, "max_steps": 4}, "min_steps must not exceed max_steps"),
        ({"min_value": 10, "max_value": 29}, r"max_value must be at least 3 \* min_value \(30\)"),
        ({"min_steps": 0}, "greater than 0"),
        ({"min_value": 0}, "greater than 0"),
        ({"train_size": -1}, "greater than or equal to 0"),
        ({"max_step": 4}, "Extra inputs are not permitted"),
    ],
)
def test_chain_arithmetic_bad_knobs_are_rejected(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChainArithmeticTask(name="chain_arithmetic", **knobs)
    with pytest.raises(ValueError, match=message):
        DataConfig(tasks=[{"name": "chain_arithmetic", **knobs}])


def test_chain_arithmetic_is_a_builtin_task_name() -> None:
    assert isinstance(DataConfig(tasks=[{"name": "chain_arithmetic"}]).tasks[0], ChainArithmeticTask)
    with pytest.raises(ValueError, match="built-in task name"):
        FileSource(name="chain_arithmetic")


# ----------------------------------------------------------------------------------------------------------------
# colour_digits: a visual task, read back from its pixels

WHITE = (255, 255, 255)
# The layout the image must have, written out rather than imported: 28-px cells (one merged 2x2 patch token of
# Qwen2-VL's 14-px patches), a 5x7 dot glyph of 3-px dots, centred (13 and 7 pixels of slack: 6 left, 3 on top).
CELL, DOT, LEFT, TOP = 28, 3, 6, 3


def _read_cell(image, row: int, col: int) -> tuple[int, str]:
    """The digit and colour name drawn in a cell, from its pixels alone; every check of the cell's layout."""
    box = image.crop((col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL))
    pixels = {(x, y): box.getpixel((x, y)) for x in range(CELL) for y in range(CELL)}
    inks = set(pixels.values()) - {WHITE}
    assert len(inks) == 1, f"cell ({row}, {col}) holds {len(inks)} colours besides white"
    ink = inks.pop()
    glyph = []
    for dot_row in range(7):
        line = ""
        for dot_col in range(5):
            block = {pixels[LEFT + dot_col * DOT + dx, TOP + dot_row * DOT + dy] for dx in range(3) for dy in range(3)}
            assert len(block) == 1, "a dot is not a solid 3x3 block"
            line += "#" if block == {ink} else "."
        glyph.append(line)
    inside = {(LEFT + x, TOP + y) for x in range(5 * DOT) for y in range(7 * DOT)}
    assert all(colour == WHITE for xy, colour in pixels.items() if xy not in inside), "ink outside the glyph box"
    digits = [digit for digit, bitmap in images.FONT.items() if bitmap == tuple(glyph)]
    names = [name for name, rgb in images.PALETTE.items() if rgb == ink]
    assert len(digits) == 1 and len(names) == 1, (glyph, ink)
    return digits[0], names[0]


def _check_colour_digits(record: dict, config: ColourDigitsTask) -> int:
    """Re-derive a record from its image and prompt; returns how many digits have the asked colour."""
    assert tuple(record) == (*COLUMNS, "images") and record["task"] == "colour_digits"
    (image,) = record["images"]
    assert image.mode == "RGB" and image.size == (config.cols * CELL, config.rows * CELL)
    asked = re.fullmatch(r"Add the (\w+) digits\.", record["prompt"])[1]
    cells = [_read_cell(image, row, col) for row in range(config.rows) for col in range(config.cols)]
    assert {colour for _, colour in cells} <= set(config.colours)
    read = [digit for digit, colour in cells if colour == asked]
    assert config.min_asked <= len(read) <= config.max_asked
    width = len(str(9 * config.max_asked)) if config.fixed_width else 1
    steps, total = [], read[0]
    for digit in read[1:]:
        left = str(total) if not steps else str(total).zfill(width)
        steps.append(f"{left}+{digit}={str(total + digit).zfill(width)}")
        total += digit
    lines = [f"{asked}: {' '.join(map(str, read))}", *steps, f"#### {str(total).zfill(width)}"]
    assert record["response"] == "\n".join(lines)
    assert record["answer"] == str(total) == str(sum(read)) and is_correct(record["response"], record["answer"])
    key = f"{record['prompt']}\n{image_sha256(image)}"
    assert record["id"] == f"colour_digits-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return len(read)


def test_colour_digits_format_on_a_hand_example() -> None:
    red, blue = images.PALETTE["red"], images.PALETTE["blue"]
    grid = images.digit_grid([3, 8, 5, 0, 7, 1], ["red", "blue", "red", "blue", "red", "blue"], cols=3)
    assert [_read_cell(grid, 0, col) for col in range(3)] == [(3, "red"), (8, "blue"), (5, "red")]
    # The top dot row of the 3 (`#####`) in the red cell, and of the 8 (`.###.`) in the blue one.
    assert [grid.getpixel((6 + 3 * x, 3)) for x in range(5)] == [red] * 5
    assert [grid.getpixel((28 + 6 + 3 * x, 3)) for x in range(5)] == [WHITE, blue, blue, blue, WHITE]
    response = "red: 3 5 7\n3+5=8\n8+7=15\n#### 15"
    record = tasks.make_record("colour_digits", "Add the red digits.", response, "15", images=[grid])
    assert _check_colour_digits(record, ColourDigitsTask(name="colour_digits")) == 3
    single = images.digit_grid([4, 8, 5, 0], ["red", "blue", "blue", "blue"], cols=2)
    record = tasks.make_record("colour_digits", "Add the red digits.", "red: 4\n#### 4", "4", images=[single])
    assert _check_colour_digits(record, ColourDigitsTask(name="colour_digits", rows=2, cols=2)) == 1


FIXED = {"colours": ["green", "black"], "min_asked": 3, "max_asked": 3, "fixed_width": True}  # names of one length


@pytest.mark.parametrize(
    "knobs", [{}, {"rows": 3, "cols": 4, "colours": ["green", "orange", "purple", "black"], "max_asked": 5}, FIXED]
)
def test_colour_digits_records_match_their_pixels(knobs: dict) -> None:
    config = ColourDigitsTask(name="colour_digits", train_size=150, eval_size=30, **knobs)
    records = generate(config, "train", seed=4) + generate(config, "eval", seed=4)
    counts = [_check_colour_digits(record, config) for record in records]
    assert set(counts) == set(range(config.min_asked, config.max_asked + 1))
    if knobs is FIXED:  # every character at a fixed offset: one length, digits where digits are
        assert {re.sub(r"[0-9]", "0", re.sub("green|black", "colour", r["response"])) for r in records} == {
            "colour: 0 0 0\n0+0=00\n00+0=00\n#### 00"
        }
    assert {re.fullmatch(r"Add the (\w+) digits\.", r["prompt"])[1] for r in records} == set(config.colours)
    if not knobs:  # the documented bound: response + EOS within a 40-token canvas
        assert max(len(record["response"]) for record in records) <= 34


def test_colour_digits_is_deterministic_and_splits_by_prompt_and_image() -> None:
    config = ColourDigitsTask(name="colour_digits", train_size=200, eval_size=40)

    def identity(records: list[dict]) -> list[tuple]:
        return [(r["id"], r["prompt"], r["response"], image_sha256(r["images"][0])) for r in records]

    train, evaluation = generate(config, "train", seed=1), generate(config, "eval", seed=1)
    assert identity(generate(config, "train", seed=1)) == identity(train)
    assert identity(generate(config, "train", seed=2)) != identity(train)
    keys = {
        split: {tasks.record_key(r["prompt"], r["images"]) for r in records}
        for split, records in (("train", train), ("eval", evaluation))
    }
    assert len(keys["train"]) == 200 and len(keys["eval"]) == 40 and not keys["train"] & keys["eval"]
    assert all(tasks.split_of(key) == split for split in keys for key in keys[split])
    # The question text alone repeats (one per colour) and is in both splits: the images tell records apart.
    assert (
        {r["prompt"] for r in train}
        == {r["prompt"] for r in evaluation}
        == {
            "Add the red digits.",
            "Add the blue digits.",
        }
    )


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"rows": 1, "cols": 3}, "rows \\* cols must be at least 4"),
        ({"colours": ["red"]}, "at least 2 distinct"),
        ({"colours": ["red", "red"]}, "at least 2 distinct"),
        ({"colours": ["red", "teal"]}, "colours.1"),
        ({"max_asked": 7}, "max_asked must not exceed rows \\* cols \\(6\\)"),
        ({"min_asked": 3, "max_asked": 2}, "min_asked must not exceed max_asked"),
        ({"max_asked": 0}, "greater than 0"),
    ],
)
def test_colour_digits_bad_knobs_are_rejected(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(tasks=[{"name": "colour_digits", **knobs}])


def test_colour_digits_palette_is_the_recipes() -> None:
    assert tuple(images.PALETTE) == get_args(Colour)
    assert len(set(images.FONT.values())) == 10  # every glyph tells its digit apart
    assert set(BUILTIN_TASKS) == set(tasks._GENERATORS) and set(tasks.IMAGE_TASKS) <= set(BUILTIN_TASKS)


def test_images_round_trip_through_the_stored_datasets(tmp_path) -> None:
    out_dir = tmp_path / "data"
    config = DataConfig(
        tasks=[
            ColourDigitsTask(name="colour_digits", train_size=12, eval_size=0),
            SortingTask(name="sorting", train_size=5, eval_size=2),
        ]
    )
    built = build_task_datasets(config, seed=3, out_dir=out_dir)
    generated = generate(config.tasks[0], "train", tasks._task_seed(3, "colour_digits"))
    for datasets in (built, load_task_datasets(out_dir)):
        visual = datasets["colour_digits"]
        assert all(visual[split].column_names == [*COLUMNS, "images"] for split in tasks.SPLITS)
        assert len(visual["eval"]) == 0  # an empty split keeps the column
        stored = list(visual["train"])  # iterating decodes the images (`to_list` would not)
        assert [(r["id"], image_sha256(r["images"][0])) for r in stored] == [
            (r["id"], image_sha256(r["images"][0])) for r in generated
        ]
        assert stored[0]["images"][0].format == "PNG"
        # A text-only task is stored exactly as before: five string columns.
        assert datasets["sorting"]["train"].column_names == list(COLUMNS)
        assert datasets["sorting"]["train"].features == tasks.FEATURES


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_every_accepted_mode_is_stored_without_loss(mode: str) -> None:
    gradient = Image.linear_gradient("L").resize((8, 8))  # many distinct pixels: a lossy format would show
    image = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).convert(mode)
    record = tasks.make_record("t", "p", "#### 1", "1", images=[image])
    (stored,) = tasks.records_to_dataset([record])[0]["images"]
    # The three modes neither PNG nor TIFF can hold come back as the plain mode they stand for.
    plain = {"La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}.get(mode)
    expected = image.convert(plain) if plain else image
    assert stored.mode == expected.mode and image_sha256(stored) == image_sha256(expected)


def test_an_edited_image_file_rebuilds_a_file_source(tmp_path) -> None:
    pictures = tmp_path / "pics"
    pictures.mkdir()
    Image.new("RGB", (56, 56), (200, 0, 0)).save(pictures / "a.png")
    rows = tmp_path / "user.jsonl"
    rows.write_text(json.dumps({"prompt": "What colour?", "response": "#### red", "image": "pics/a.png"}) + "\n")
    config = DataConfig(files=[FileSource(name="mine", train_path=rows)])
    first = build_task_datasets(config, seed=0, out_dir=tmp_path / "data")["mine"]["train"][0]
    # The data file is unchanged; only the picture it names is new.
    Image.new("RGB", (56, 56), (0, 0, 200)).save(pictures / "a.png")
    again = build_task_datasets(config, seed=0, out_dir=tmp_path / "data")["mine"]["train"][0]
    assert again["images"][0].getpixel((0, 0)) == (0, 0, 200) != first["images"][0].getpixel((0, 0))
    assert load_task_datasets(tmp_path / "data")["mine"]["train"][0]["id"] == again["id"] != first["id"]


def test_a_text_file_keeps_its_fingerprint_and_one_with_images_gets_another(tmp_path) -> None:
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def fingerprint_without_images(source: FileSource) -> str:
        # The formula from before images were read: data a text-only run stored must be reused as it is.
        payload = {"config": source.model_dump(mode="json"), "seed": 0, "version": tasks.DATA_FORMAT_VERSION}
        payload["contents"] = [sha256(source.train_path.read_bytes()), None]
        return sha256(json.dumps(payload, sort_keys=True).encode())

    rows = tmp_path / "user.jsonl"
    rows.write_text(json.dumps({"prompt": "2+2?", "response": "#### 4"}) + "\n")
    text = FileSource(name="mine", train_path=rows)
    assert tasks._fingerprint(text, 0) == fingerprint_without_images(text)
    # Images given as bytes are covered by the file's digest, yet they mark the source as one with images: a copy
    # stored before images were read (without them) is not reused.
    parquet = tmp_path / "user.parquet"
    row = {"prompt": "2+2?", "response": "#### 4", "image": png_bytes(Image.new("RGB", (56, 56)))}
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([row]), parquet)
    with_bytes = FileSource(name="mine", train_path=parquet)
    assert tasks._fingerprint(with_bytes, 0) != fingerprint_without_images(with_bytes)
