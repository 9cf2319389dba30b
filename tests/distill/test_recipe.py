"""Recipe schema, overrides and the CLI's handling of malformed recipes (exit 2, dotted path, nothing written)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.recipe import RecipeError, dump_recipe, load_recipe
from teachers.interface import BACKBONES
from tests.builders import BACKBONE_FIXTURES

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = {
    "run": {"name": "t"},
    "teacher": {"pretrain": {"ar": {"max_steps": 1}, "diffusion": {"max_steps": 1}}},
    "data": {"tasks": [{"name": "addition", "train_size": 10, "eval_size": 5}]},
}


def write(tmp_path: Path, tree, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


def checkpoint_overrides(path: Path, tmp_path: Path) -> list[str]:
    """A recipe for a downloaded checkpoint takes the folder and the data files on the command line: here the
    published-layout fixture of its backbone and a one-row GSM8K file."""
    if path.stem == "bench-1b":  # speed benchmarks of a checkpoint given on the command line
        return [f"teacher.path={BACKBONE_FIXTURES / 'dream'}"]
    if path.stem not in BACKBONES:
        return []
    rows = tmp_path / "gsm8k.jsonl"
    rows.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    data = [f"data.files.0.train_path={rows}", f"data.files.0.eval_path={rows}"]
    return [f"teacher.path={BACKBONE_FIXTURES / path.stem}", *data]


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_every_shipped_recipe_validates(path, tmp_path):
    recipe = load_recipe(path, checkpoint_overrides(path, tmp_path))
    if path.stem in BACKBONES:
        assert recipe.teacher.name == path.stem and recipe.student.lora.target_modules is None
        with pytest.raises(RecipeError, match="teacher"):
            load_recipe(path)  # the checkpoint folder is required
    # The resolved dump is itself a valid recipe that resolves to the same thing.
    again = load_recipe(write(tmp_path, dump_recipe(recipe), f"resolved-{path.name}"))
    assert again == recipe


def test_overrides_are_typed_and_reach_lists(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        [
            "train.lr=3e-4",
            "data.tasks.0.max_digits=2",
            "eval.rows=[teacher, ar-baseline]",
            "run.stages=[teacher]",
            "train.betas=[0.8, 0.9]",
        ],
    )
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.data.tasks[0].max_digits == 2
    assert recipe.eval.rows == ["teacher", "ar-baseline"]
    assert recipe.run.stages == ["teacher"]
    assert recipe.train.betas == (0.8, 0.9)
    assert recipe.run.output_dir == Path("runs/t")


def test_delete_override_restores_default(tmp_path):
    tree = dict(MINIMAL, eval={"max_samples": 3})
    recipe = load_recipe(write(tmp_path, tree), ["~eval.max_samples"])
    assert recipe.eval.max_samples is None


def test_section_hash_tracks_content(tmp_path):
    path = write(tmp_path, MINIMAL)
    base = load_recipe(path).section_hash("teacher", "data")
    assert load_recipe(path, ["train.lr=1e-2"]).section_hash("teacher", "data") == base
    assert load_recipe(path, ["data.tasks.0.max_digits=2"]).section_hash("teacher", "data") != base


# Each case: (recipe tree or raw YAML text, overrides, text the one-line error must contain).
MALFORMED = [
    ("unknown-key", dict(MINIMAL, train={"learning_rate": 1}), [], "train.learning_rate: unknown key"),
    ("unknown-section", dict(MINIMAL, trainer={}), [], "trainer: unknown key"),
    ("unknown-override", MINIMAL, ["train.lrr=1"], "train.lrr: unknown key"),
    ("wrong-type-int", MINIMAL, ["train.max_steps=many"], "train.max_steps"),
    ("wrong-type-bool", MINIMAL, ["logging.progress=maybe"], "logging.progress"),
    ("wrong-type-list", MINIMAL, ["eval.rows=teacher"], "eval.rows"),
    ("negative-size", MINIMAL, ["teacher.pretrain.model.hidden_size=-8"], "teacher.pretrain.model.hidden_size"),
    ("zero-batch", MINIMAL, ["train.micro_batch_size=0"], "train.micro_batch_size"),
    ("negative-lr", MINIMAL, ["train.lr=-1"], "train.lr"),
    ("bad-enum", MINIMAL, ["train.zero_stage=4"], "train.zero_stage"),
    ("bad-precision", MINIMAL, ["train.precision=fp16"], "train.precision"),
    ("bad-path", MINIMAL, ["teacher.path=/nonexistent/teacher"], "teacher.path"),
    ("bad-data-path", MINIMAL, ["data.files=[{name: mine, train_path: /nope.jsonl}]"], "data.files.0.train_path"),
    ("missing-section", {k: v for k, v in MINIMAL.items() if k != "data"}, [], "data: required but missing"),
    ("missing-run", {k: v for k, v in MINIMAL.items() if k != "run"}, [], "run: required but missing"),
    ("bad-yaml", "run: {name: t\nteacher: [", [], "invalid YAML"),
    ("not-a-mapping", "- just\n- a list\n", [], "top level must be a mapping"),
    ("bad-task-name", MINIMAL, ["data.tasks.0.name=division"], "data.tasks.0"),
    ("heads-mismatch", MINIMAL, ["teacher.pretrain.model.num_attention_heads=3"], "teacher.pretrain.model"),
    ("digits-order", MINIMAL, ["data.tasks.0.min_digits=4"], "data.tasks.0"),
    ("bad-override-syntax", MINIMAL, ["train.lr"], "train.lr"),
    ("bad-list-index", MINIMAL, ["data.tasks.5.max_digits=2"], "data.tasks.5"),
    ("unknown-eval-task", MINIMAL, ["eval.tasks=[sorting]"], "eval"),
    ("bad-run-name", MINIMAL, ["run.name=../escape"], "run.name"),
    ("no-teacher-weights", MINIMAL, ["~teacher.pretrain"], "teacher"),
    ("bad-decoder-name", MINIMAL, ["eval.decoder.name=fastest"], "eval.decoder.name"),
    ("bad-threshold", MINIMAL, ["eval.decoder.name=confident", "eval.decoder.threshold=1.5"], "eval.decoder"),
    ("bad-entropy-bound", MINIMAL, ["eval.decoders=[{name: multi_block, threshold: -1}]"], "eval.decoders.0"),
    ("bad-sweep-steps", MINIMAL, ["eval.decoder.sweep=[2.5]"], "sweep value 2.5"),
    ("bad-sweep-threshold", MINIMAL, ["eval.decoders=[{name: threshold, sweep: [0.5, 1.2]}]"], "eval.decoders.0"),
    ("bad-cache", MINIMAL, ["eval.decoder.cache=dual"], "eval.decoder.cache"),
    ("bad-top-p", MINIMAL, ["eval.decoder.top_p=0"], "eval.decoder.top_p"),
    ("bad-activation", MINIMAL, ["eval.decoder.full_activate_fraction=0.05"], "eval.decoder"),
    ("block-not-dividing", MINIMAL, ["eval.decoder.block_length=5"], "eval.decoder: gen_length 32"),
    ("pin-outside", MINIMAL, ["eval.decoder.pins={40: x}"], "eval.decoder: pins"),
    ("checkpoint-no-path", MINIMAL, ["eval.checkpoints=[{name: x}]"], "eval.checkpoints.0.path"),
    ("duplicate-row", MINIMAL, ["eval.checkpoints=[{name: teacher, path: x}]"], "row names must be unique"),
    ("duplicate-decoder", MINIMAL, ["eval.decoders=[{name: low_confidence}]"], "decoder labels must be unique"),
    ("bad-alpha", MINIMAL, ["eval.alpha=0"], "eval.alpha"),
    ("deepspeed-unknown-profile", MINIMAL, ["train.deepspeed=zero9"], "train.deepspeed: Value error, unknown"),
    ("deepspeed-missing-file", MINIMAL, ["train.deepspeed=ds/none.json"], "train.deepspeed: Value error, DeepSpeed"),
    # The recipe file itself, read as JSON (the test runs in the recipe's folder).
    ("deepspeed-invalid-json", MINIMAL, ["train.deepspeed=./recipe.yaml"], "invalid JSON at line 1"),
    ("deepspeed-stage-mismatch", MINIMAL, ["train.deepspeed=zero3", "train.zero_stage=1"], "but zero_stage is 1"),
    ("deepspeed-unknown-auto", MINIMAL, ["train.deepspeed={steps_per_print: auto}"], "'steps_per_print' is \"auto\""),
    ("deepspeed-optimizer", MINIMAL, ["train.deepspeed={optimizer: {type: Adam}}"], "remove 'optimizer'"),
    ("deepspeed-batch", MINIMAL, ["train.deepspeed={gradient_accumulation_steps: 4}"], "set gradient_accumulation"),
    (
        "task-source-not-a-regulariser",
        MINIMAL,
        ["distill.losses=[{kind: trajectory_ce, source: task}]"],
        "distill.losses.0: Value error, source: task is for the regularisers",
    ),
    (
        "prefix-rows-on-a-term-without-noising",
        MINIMAL,
        ["distill.losses=[{kind: trajectory_ce, prefix_fraction: 0.5}]"],
        "prefix_fraction is for the masked_diffusion term",
    ),
    (
        "prefix-block-without-prefix-rows",
        MINIMAL,
        ["distill.losses=[{kind: next_token, prefix_block: 16}]"],
        "distill.losses.0: Value error, prefix_block sizes the block rows of prefix_fraction",
    ),
    (
        "teacher-prefix-block-without-prefix-rows",
        MINIMAL,
        ["teacher.pretrain.prefix_block=16"],
        "teacher.pretrain: Value error, prefix_block sizes the block rows of prefix_fraction",
    ),
    ("sdtt-mixed", MINIMAL, ["distill.losses=[{kind: sdtt}, {kind: trajectory_ce}]"], "distill.losses"),
    ("sdtt-zero3", MINIMAL, ["run.stages=[distill]", "distill.losses=[{kind: sdtt}]", "train.zero_stage=3"], "sdtt"),
    (
        "pretrain-zero3",
        MINIMAL,
        ["teacher.pretrain.diffusion.zero_stage=3"],
        "teacher.pretrain.diffusion: Value error, zero_stage 3",
    ),
]


@pytest.mark.parametrize("tree,overrides,expected", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_exits_2_with_dotted_path(tmp_path, capsys, monkeypatch, tree, overrides, expected):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError, match=None) as caught:
        load_recipe(path, overrides)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)

    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", str(path), *overrides])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_missing_recipe_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_validate_prints_resolved_recipe(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, MINIMAL)), "train.lr=0.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["lr"] == 0.5 and resolved["run"]["output_dir"] == "runs/t"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("verb", [[], ["run"], ["validate"], ["eval"]])
def test_help_for_every_verb(verb):
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", *verb, "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0 and "usage: distill" in result.stdout


def test_stray_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["run", "recipes/teacher-tiny.yaml", "--bogus"])
    assert caught.value.code == 2


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(tmp_path, capsys):
    # `deepspeed --module distill.cli run ...` starts each rank as `python -m distill.cli --local_rank=N run ...`.
    assert main(["--local_rank=1", "validate", str(write(tmp_path, MINIMAL))]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["output_dir"] == "runs/t"
