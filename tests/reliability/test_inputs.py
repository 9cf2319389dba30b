"""Hostile input refused before work: each case exits 2 with one `distill:` line naming the field, or the file and
row, no traceback, and the run directory as it was (not created when it did not exist; byte for byte when it
did); a corrupt teacher fewstep wrote exits 1 as loading it would, but before work too. Then one `distill` per run
directory: a second one on a locked directory exits 2 naming the holder's pid.

The runs use the shared tiny teacher of `tests/distill/conftest.py` (64 positions, the character tokenizer) and
a trajectories stage on 8 addition prompts, which takes a second or two when nothing refuses it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from distill.cli import main
from distill.files import LOCK_FILE, lock_directory, temp_name, write_atomically
from distill.recipe import RecipeError, load_recipe
from distill.run import held_run_directory
from teachers.manifest import MANIFEST_FILE
from tests.bad_images import BAD_IMAGES
from tests.builders import BACKBONE_FIXTURES
from tests.distill.conftest import teacher_dir  # noqa: F401  (the shared session fixture)
from tests.launch import REPO, child_env
from tests.reliability.checks import assert_refused, tree_digest


def base_tree(teacher: Path, out: Path) -> dict:
    return {
        "run": {"name": "inputs", "output_dir": str(out), "stages": ["trajectories"]},
        "teacher": {"path": str(teacher)},
        "data": {
            "max_response_tokens": 24,
            "tasks": [{"name": "addition", "train_size": 8, "eval_size": 2, "max_digits": 3}],
        },
        "trajectories": {"block_length": 8, "batch_size": 8, "shards": 1, "temperatures": [0.0]},
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }


def user_file(tmp_path: Path, rows: list[dict] | str, name: str = "user.jsonl") -> Path:
    path = tmp_path / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(row) + "\n" for row in rows))
    return path


def with_user_data(tree: dict, path: Path, split: str = "train_path") -> None:
    tree["data"]["files"] = [{"name": "user", split: str(path)}]


def qa(question: str, answer: str = "2") -> dict:
    return {"question": question, "answer": f"{answer} #### {answer}"}


# ----------------------------------------------------------------------------------------------------------------
# The cases: each edits the recipe tree (and writes what it needs under tmp_path/inputs), and returns the text
# the one error line must hold, or a `Refusal` when it writes the recipe file itself or expects another code.


class Refusal(NamedTuple):
    expected: str
    recipe: Path | None = None
    code: int = 2  # 1: what the stage itself would raise (a corrupt file fewstep wrote), raised before work


Case = Callable[[dict, Path], "str | Refusal"]


def recipe_not_utf8(tree: dict, tmp_path: Path) -> Refusal:
    path = tmp_path / "inputs" / "latin1.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"# caf\xe9\n" + yaml.safe_dump(tree).encode())
    return Refusal(f"{path}: line 1: not UTF-8", path)


def duplicate_yaml_key(tree: dict, tmp_path: Path) -> Refusal:
    path = tmp_path / "inputs" / "twice.yaml"
    path.parent.mkdir(exist_ok=True)
    text = yaml.safe_dump(tree) + "train:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.001\n"
    path.write_text(text)
    return Refusal(f"{path}: line 28 invalid YAML: duplicate key 'lr' (first given on line 26)", path)


def infinite_lr(tree: dict, tmp_path: Path) -> str:
    tree["train"] = {"lr": math.inf}
    return "train.lr: inf is not a finite number"


def nan_in_a_string(tree: dict, tmp_path: Path) -> str:
    tree["teacher"]["path"] = None
    tree["teacher"]["pretrain"] = {"mask_eps": "nan"}
    return "teacher.pretrain.mask_eps"


def nan_in_deepspeed_json(tree: dict, tmp_path: Path) -> str:
    path = tmp_path / "inputs" / "ds.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text('{"zero_optimization": {"stage": 1}, "gradient_predivide_factor": NaN}')
    tree["train"] = {"deepspeed": str(path)}
    return f"{path}: NaN is not a finite number"


def misspelt_deepspeed_key(tree: dict, tmp_path: Path) -> str:
    tree["train"] = {"deepspeed": {"zero_optimizaton": {"stage": 2}}}
    return "'zero_optimizaton' is not a DeepSpeed"


def misspelt_nested_deepspeed_key(tree: dict, tmp_path: Path) -> str:
    tree["train"] = {"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"devcie": "cpu"}}}}
    return "'zero_optimization.offload_optimizer.devcie' is not a DeepSpeed"


def empty_output_dir(tree: dict, tmp_path: Path) -> str:
    tree["run"]["output_dir"] = ""
    return "run.output_dir: Value error, empty path"


def output_dir_is_a_file(tree: dict, tmp_path: Path) -> str:
    path = user_file(tmp_path, "not a directory", "file.txt")
    tree["run"]["output_dir"] = str(path)
    return f"run.output_dir: Value error, {path} is a file"


def teacher_path_is_a_file(tree: dict, tmp_path: Path) -> str:
    tree["teacher"]["path"] = str(Path(tree["teacher"]["path"]) / "config.json")
    return f"{tree['teacher']['path']} is a file, not a checkpoint folder"


def teacher_path_is_an_empty_folder(tree: dict, tmp_path: Path) -> str:
    empty = tmp_path / "inputs" / "empty-teacher"
    empty.mkdir(parents=True)
    tree["teacher"]["path"] = str(empty)
    return f"{empty} holds no *.safetensors weights"


def truncated_teacher(tree: dict, tmp_path: Path, published: bool = False) -> Path:
    teacher = Path(shutil.copytree(tree["teacher"]["path"], tmp_path / "inputs" / "teacher"))
    if published:
        (teacher / MANIFEST_FILE).unlink()  # as downloaded: no manifest of fewstep's
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    tree["teacher"]["path"] = str(teacher)
    return weights


def published_teacher_truncated(tree: dict, tmp_path: Path) -> str:
    weights = truncated_teacher(tree, tmp_path, published=True)
    return f"teacher.path: {weights} is not a readable safetensors file"


def written_teacher_truncated(tree: dict, tmp_path: Path) -> Refusal:
    weights = truncated_teacher(tree, tmp_path)
    return Refusal(f"{weights}: truncated or replaced", code=1)


def empty_user_file(tree: dict, tmp_path: Path) -> str:
    path = user_file(tmp_path, "")
    with_user_data(tree, path)
    return f"{path}: no rows"


def blank_user_file(tree: dict, tmp_path: Path) -> str:
    path = user_file(tmp_path, "\n   \n\t\n")
    with_user_data(tree, path, "eval_path")
    return f"{path}: no rows"


def no_training_records(tree: dict, tmp_path: Path) -> str:
    tree["data"]["tasks"][0]["train_size"] = 0
    return "data: the trajectories stage has no training records (data.tasks.0.train_size is 0)"


def no_eval_records(tree: dict, tmp_path: Path) -> str:
    tree["run"]["stages"] = ["eval"]
    tree["data"]["tasks"][0]["eval_size"] = 0
    return "data.tasks.0.eval_size is 0: the eval stage has no eval records of task 'addition'"


def prompt_beyond_positions(tree: dict, tmp_path: Path) -> str:
    # 3 tokens of chat markup + 45 characters + the 24-token canvas: 72 positions, the teacher has 64.
    path = user_file(tmp_path, [qa("1+1?"), qa("What is one plus one? " + "Answer in digits only. ")])
    with_user_data(tree, path)
    return f"{path}: line 2: record user-"


def task_prompt_beyond_positions(tree: dict, tmp_path: Path) -> str:
    # Word problems run to ~90 characters: beyond the teacher's 64 positions even before the canvas.
    tree["data"]["tasks"].append({"name": "word_problems", "train_size": 4, "eval_size": 2})
    return "data.tasks.1 (word_problems): record word_problems-"


def character_the_tokenizer_lacks(tree: dict, tmp_path: Path) -> str:
    path = user_file(tmp_path, [qa("1+1?"), qa("2+2?", "4"), qa("3\u00d74?", "12")])
    with_user_data(tree, path)
    return f"{path}: line 3: record user-"


def response_beyond_the_canvas(tree: dict, tmp_path: Path) -> str:
    path = user_file(tmp_path, [{"prompt": "count", "response": "1 2 3 4 5 6 7 8 9 10 11 12 #### 12"}])
    with_user_data(tree, path)
    return f"{path}: line 1: record user-"


def user_file_with_image(tmp_path: Path, tree: dict, case: str) -> str:
    """A gsm8k file whose line 2 shows `inputs/pics/bad.<ext>`, a bad image of `tests.bad_images`; the expected
    error: the data file, the line, the image as the row names it, the problem."""
    write, suffix, problem = BAD_IMAGES[case]
    image = tmp_path / "inputs" / "pics" / f"bad.{suffix}"
    image.parent.mkdir(parents=True)
    write(image)
    path = user_file(tmp_path, [qa("1+1?"), qa("Which digit is drawn?", "3") | {"image": f"pics/bad.{suffix}"}])
    with_user_data(tree, path)
    return f"{path}: line 2: image (pics/bad.{suffix}): {problem.format(image=image)}"


def image_file_missing(tree: dict, tmp_path: Path) -> str:
    return user_file_with_image(tmp_path, tree, "missing")


def image_truncated(tree: dict, tmp_path: Path) -> str:
    return user_file_with_image(tmp_path, tree, "truncated")


def image_16_bit(tree: dict, tmp_path: Path) -> str:
    return user_file_with_image(tmp_path, tree, "16-bit")


def image_float_tiff(tree: dict, tmp_path: Path) -> str:
    return user_file_with_image(tmp_path, tree, "float")


def image_zero_size(tree: dict, tmp_path: Path) -> str:
    return user_file_with_image(tmp_path, tree, "zero-size")


def image_tokens_without_an_image(tree: dict, tmp_path: Path) -> str:
    # Image tokens are placed by fewstep's chat formatting; written by hand they would stand for no image.
    path = user_file(tmp_path, [qa("1+1?"), qa("What is in <|image_pad|>?")])
    with_user_data(tree, path)
    return f"{path}: line 2: column 'question' holds the vision token '<|image_pad|>'"


def distill_without_trajectories(tree: dict, tmp_path: Path) -> str:
    tree["run"]["stages"] = ["distill"]
    tree["distill"] = {"curriculum": {"windows": [8, 24]}}
    return "run.stages: the distill stage trains on the trajectory set"


def eval_row_never_made(tree: dict, tmp_path: Path) -> str:
    tree["run"]["stages"] = ["eval"]
    tree["eval"] = {"rows": ["teacher", "student"]}
    return "eval.rows: no checkpoint for row 'student'"


def eval_checkpoint_missing(tree: dict, tmp_path: Path) -> str:
    tree["run"]["stages"] = ["eval"]
    tree["eval"] = {"checkpoints": [{"name": "other", "path": str(tmp_path / "inputs" / "absent")}]}
    return "eval.checkpoints.0.path"


def llada_pretraining(tree: dict, tmp_path: Path) -> str:
    # LLaDA's unshifted head under the AR phase's causal attention would learn to copy its input.
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    tree["teacher"] = {"name": "llada", "pretrain": {"model": sizes}}
    tree["run"]["stages"] = ["teacher"]
    return "teacher.pretrain: the AR phase cannot train a llada teacher"


def next_token_on_llada(tree: dict, tmp_path: Path) -> str:
    tree["teacher"] = {"path": str(BACKBONE_FIXTURES / "llada")}
    tree["run"]["stages"] = ["trajectories", "distill"]
    terms = [{"kind": "trajectory_ce", "weight": 1.0}, {"kind": "next_token", "weight": 0.5}]
    tree["distill"] = {"losses": terms, "curriculum": {"windows": [8, 24]}}
    return "distill.losses: next_token cannot train a llada student"


def export_without_checkpoints(tree: dict, tmp_path: Path) -> str:
    tree["run"]["stages"] = ["export"]
    return "run.stages: the export stage exports a distillation checkpoint"


CASES: dict[str, Case] = {
    case.__name__: case
    for case in (
        recipe_not_utf8,
        duplicate_yaml_key,
        infinite_lr,
        nan_in_a_string,
        nan_in_deepspeed_json,
        misspelt_deepspeed_key,
        misspelt_nested_deepspeed_key,
        empty_output_dir,
        output_dir_is_a_file,
        teacher_path_is_a_file,
        teacher_path_is_an_empty_folder,
        published_teacher_truncated,
        written_teacher_truncated,
        empty_user_file,
        blank_user_file,
        no_training_records,
        no_eval_records,
        prompt_beyond_positions,
        task_prompt_beyond_positions,
        character_the_tokenizer_lacks,
        response_beyond_the_canvas,
        image_file_missing,
        image_truncated,
        image_16_bit,
        image_float_tiff,
        image_zero_size,
        image_tokens_without_an_image,
        distill_without_trajectories,
        eval_row_never_made,
        eval_checkpoint_missing,
        export_without_checkpoints,
        llada_pretraining,
        next_token_on_llada,
    )
}
# Cases that do not make sense on the finished run below (it has a trajectory set; its output_dir is fixed).
NEED_A_NEW_DIRECTORY = {"distill_without_trajectories", "empty_output_dir", "output_dir_is_a_file"}


def refuse(case: str, tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Run the case through `distill run` and check the refusal: exit 2, one line holding the case's text, no
    traceback. (The caller checks the directories.)"""
    found = CASES[case](tree, tmp_path)
    refusal = found if isinstance(found, Refusal) else Refusal(found)
    recipe = refusal.recipe or tmp_path / "recipe.yaml"
    if refusal.recipe is None:
        recipe.write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err
    assert code == refusal.code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("distill:")]
    assert len(lines) == 1 and refusal.expected in lines[0], err


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_refused_before_anything_is_written(case, teacher_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # an empty output_dir would have meant this directory
    out = tmp_path / "run"
    tree = base_tree(teacher_dir, out)
    refuse(case, tree, tmp_path, capsys)
    assert not out.exists()
    assert set(os.listdir(tmp_path)) <= {"inputs", "recipe.yaml"}  # nothing else, in particular no data/


@pytest.fixture(scope="module")
def finished_run(teacher_dir, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("inputs")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_tree(teacher_dir, root / "run")))
    assert main(["run", str(recipe)]) == 0
    return root / "run"


@pytest.mark.parametrize("case", sorted(set(CASES) - NEED_A_NEW_DIRECTORY))
def test_hostile_input_leaves_an_earlier_run_as_it_was(case, finished_run, teacher_dir, tmp_path, capsys):  # noqa: F811
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = tree_digest(run)
    refuse(case, base_tree(teacher_dir, run), tmp_path, capsys)
    assert tree_digest(run) == before, "the refused run changed the run directory (recipe.yaml, data/, ...)"


def test_a_good_rerun_passes_the_same_checks(finished_run, teacher_dir, tmp_path):  # noqa: F811
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_tree(teacher_dir, run) | {"train": {"lr": 0.01}}))
    assert main(["run", str(recipe)]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["lr"] == 0.01
    assert not (run / LOCK_FILE).exists()


IMAGE_CASES = [case for case in CASES if case.startswith("image_")]


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_validate_refuses_a_bad_image_as_run_does(case, teacher_dir, tmp_path, capsys):  # noqa: F811
    tree = base_tree(teacher_dir, tmp_path / "run")
    expected = CASES[case](tree, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    code = main(["validate", str(recipe)])
    assert_refused(code, capsys.readouterr().err, expected, tmp_path, before, expected=2)
    assert not (tmp_path / "run").exists()


def test_validate_refuses_what_run_refuses(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "v"}, "teacher": {"pretrain": {}}, "data": {"tasks": []}}))
    assert main(["validate", str(path), "train.lr=.inf"]) == 2
    assert "train.lr: inf is not a finite number" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="data.tasks.0.eval_size"):
        load_recipe(path, ["data.tasks=[{name: addition, eval_size: .nan}]"])


# ----------------------------------------------------------------------------------------------------------------
# One run per directory

HOLDER = """
import sys
from pathlib import Path
from distill.files import lock_directory
with lock_directory(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold(directory: Path, tmp_path: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        cwd=REPO,
        env=child_env(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_locked_directory_exits_2_naming_the_holder(finished_run, teacher_dir, tmp_path, capsys):  # noqa: F811
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_tree(teacher_dir, run)))
    holder = hold(run, tmp_path)
    try:
        before = tree_digest(run)
        assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
        for _ in range(2):  # refused twice: a refusal neither takes nor breaks the lock
            capsys.readouterr()
            code = main(["run", str(recipe)])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.startswith("distill:")]
            assert code == 2 and "Traceback" not in err, err
            assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "run.output_dir" in lines[0], err
            assert tree_digest(run) == before
    finally:
        holder.communicate("", timeout=30)
    assert not (run / LOCK_FILE).exists()  # released and removed by its holder


def test_a_killed_holder_leaves_no_lock_behind(finished_run, teacher_dir, tmp_path):  # noqa: F811
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_tree(teacher_dir, run)))
    holder = hold(run, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (run / LOCK_FILE).is_file()  # the file stays, with a dead pid; the lock went with the process
    assert main(["run", str(recipe)]) == 0
    assert not (run / LOCK_FILE).exists()


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with held_run_directory(tmp_path / "run"):
        assert not (tmp_path / "run").exists()  # rank 1 neither creates nor locks the directory
    monkeypatch.setenv("RANK", "0")
    with held_run_directory(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_lock_in_this_process_refuses_a_second_one(tmp_path):
    with lock_directory(tmp_path):
        with pytest.raises(OSError, match=f"pid {os.getpid()}"):
            with lock_directory(tmp_path):
                pass
    with lock_directory(tmp_path):  # released: taken again
        pass


def test_temp_names_are_unique_per_writer_and_never_left_behind(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    names = {temp_name(target) for _ in range(100)}
    assert len(names) == 100 and all(f".{os.getpid()}." in name.name for name in names)

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, "x")
    assert list(tmp_path.iterdir()) == []
