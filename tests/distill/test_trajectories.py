"""Pseudo-trajectories on a tiny random teacher: order semantics replayed against the teacher, the training chat
format, the manifest and storage checks, resume after SIGKILL and two ranks under torchrun (real `datasets`)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk

from distill.cli import main
from distill.data import SequencePool, encode_records
from distill.decoding import confidence_of, entropy, sample_tokens
from distill.recipe import DecoderConfig, load_recipe
from distill.trajectories import (
    COMPLETE_MARKER,
    MANIFEST_FILE,
    SET_DIR,
    SHARDS_DIR,
    expected_manifest,
    load_trajectories,
    shard_name,
    training_records,
    trajectories_command,
)
from eval.tasks import build_task_datasets, is_correct
from teachers.interface import load_teacher, save_teacher
from teachers.manifest import sha256_of, write_manifest
from tests.builders import tiny_teacher
from tests.launch import REPO, child_env, run_launched

CANVAS, BLOCK = 24, 8


def recipe_file(tmp_path: Path, teacher_dir: Path, name: str = "run", train_size: int = 24, **trajectories) -> Path:
    tree = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "stages": ["trajectories"]},
        "teacher": {"path": str(teacher_dir)},
        "data": {
            "max_response_tokens": CANVAS,
            "tasks": [{"name": "addition", "train_size": train_size, "eval_size": 2, "max_digits": 3}],
        },
        "trajectories": {"block_length": BLOCK, "batch_size": 4, "shards": 3, **trajectories},
        "logging": {"progress": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def generate(tmp_path: Path, teacher_dir: Path, name: str = "run", **settings):
    recipe = load_recipe(recipe_file(tmp_path, teacher_dir, name, **settings))
    summary = trajectories_command(recipe)
    return recipe, summary, load_from_disk(str(Path(recipe.run.output_dir) / SET_DIR))


def records_of(recipe) -> list[dict]:
    datasets = build_task_datasets(recipe.data, recipe.run.seed, Path(recipe.run.output_dir) / "data")
    return training_records(recipe, datasets)


# ----------------------------------------------------------------------------------------------------------------
# What a trajectory records


def test_rows_record_one_token_per_forward_block_by_block_on_the_training_prompt(tmp_path, teacher_dir, capsys):
    recipe, summary, rows = generate(tmp_path, teacher_dir)
    records = records_of(recipe)
    teacher = load_teacher(None, teacher_dir)
    assert rows["sample_id"] == [record["id"] for record in records]
    assert len(set(rows["sample_id"])) == len(rows) == summary["samples"] == 24

    examples = encode_records(teacher, records, CANVAS)
    pool = SequencePool(examples, 1, CANVAS, teacher.pad_token_id, seed=0, pad_answers=False)
    for row, record, example in zip(rows, records, examples, strict=True):
        # The prompt is the chat format training uses, and the response sits right after it in a training row.
        assert row["prompt_ids"] == teacher.encode_prompt(record["prompt"]).ids == example.prompt
        assert row["response_ids"] == example.response
        pool.groups = {"": [example]}
        batch = pool.batch(0)
        start = int(batch["response_mask"][0].nonzero()[0])
        assert start == len(row["prompt_ids"])
        assert batch["input_ids"][0, start : start + len(row["response_ids"])].tolist() == row["response_ids"]

        # One token per forward: the committed positions' steps are exactly 0..nfe-1.
        order = row["order"]
        assert len(order) == len(row["teacher_ids"]) == len(row["target_ids"]) == CANVAS
        assert sorted(step for step in order if step >= 0) == list(range(row["nfe"]))
        # Block by block: every committed position of a block precedes those of the next block.
        blocks = [[step for step in order[b : b + BLOCK] if step >= 0] for b in range(0, CANVAS, BLOCK)]
        for first, second in zip(blocks, blocks[1:], strict=False):
            assert not first or not second or max(first) < min(second)
        # Uncommitted positions are the EOS-filled tail after the teacher's answer.
        assert all(row["teacher_ids"][j] == teacher.eos_token_id for j in range(CANVAS) if order[j] < 0)
        reference = row["response_ids"] + [teacher.pad_token_id] * (CANVAS - len(row["response_ids"]))
        assert row["target_ids"] == reference
        assert row["teacher_correct"] == is_correct(teacher.decode_response(row["teacher_ids"]), record["answer"])

    # A random teacher answers wrongly: every sample was retried at 0.4, and the retry is what is kept.
    assert summary["first_correct"] == 0 and summary["retried"] == 24
    assert set(rows["temperature"]) == {0.4}

    # The same command again finds the set up to date and decodes nothing.
    capsys.readouterr()
    assert trajectories_command(recipe)["decoded_now"] == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("choice", ["confidence", "entropy"])
def test_each_forward_commits_the_position_the_choice_ranks_first(tmp_path, teacher_dir, choice):
    # Replay the greedy trajectory one forward at a time and check the committed position is the top-ranked one.
    recipe, _, rows = generate(tmp_path, teacher_dir, train_size=4, choice=choice, temperatures=[0.0], batch_size=1)
    teacher = load_teacher(None, teacher_dir)
    config = DecoderConfig(temperature=0.0)
    for row in rows:
        order, prompt = torch.tensor(row["order"]), torch.tensor(row["prompt_ids"])
        for step in range(row["nfe"]):
            masked = (order < 0) | (order >= step)
            canvas = torch.where(masked, teacher.mask_token_id, torch.tensor(row["teacher_ids"]))
            logits = teacher.forward(torch.cat([prompt, canvas])[None])[0, len(prompt) :]
            logits[:, teacher.mask_token_id] = -torch.inf
            tokens, probs = sample_tokens(logits, config, None)
            score = confidence_of(probs, tokens, "probability") if choice == "confidence" else -entropy(probs)
            block = int(masked.nonzero()[0]) // BLOCK
            in_block = torch.zeros_like(masked)
            in_block[block * BLOCK : (block + 1) * BLOCK] = True
            score = torch.where(masked & in_block, score, torch.full_like(score, -torch.inf))
            assert int(score.argmax()) == int((order == step).nonzero()[0])
            assert row["teacher_ids"][int(score.argmax())] == int(tokens[score.argmax()])


def test_keep_correct_and_teacher_tokens(tmp_path, teacher_dir):
    _, summary, rows = generate(tmp_path, teacher_dir, "correct", train_size=6, keep="correct", temperatures=[0.0])
    assert len(rows) == summary["samples"] == summary["correct"] == 0  # a random teacher gets nothing right
    assert summary["decoded"] == 6
    _, _, rows = generate(tmp_path, teacher_dir, "teacher", train_size=6, tokens="teacher", temperatures=[0.0])
    assert rows["target_ids"] == rows["teacher_ids"] and set(rows["temperature"]) == {0.0}


def test_cli_errors_are_one_line(tmp_path, teacher_dir, capsys):
    path = recipe_file(tmp_path, teacher_dir, train_size=4)
    assert main(["trajectories", str(path), "trajectories.block_length=7"]) == 2
    assert "trajectories.block_length: 7 does not divide the 24-token canvas" in capsys.readouterr().err
    # A reference answer longer than the canvas names its record, before anything is written.
    assert main(["trajectories", str(path), "data.max_response_tokens=8", "trajectories.block_length=8"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "record addition-" in error and "response needs 17 tokens" in error
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="trajectories.block_length: 32 does not divide"):
        load_recipe(path, ["~trajectories.block_length"])


# ----------------------------------------------------------------------------------------------------------------
# Never a set used silently


def test_manifest_mismatch_names_the_field(tmp_path, teacher_dir):
    recipe, _, _ = generate(tmp_path, teacher_dir, train_size=6)
    records = records_of(recipe)
    set_dir = Path(recipe.run.output_dir) / SET_DIR
    assert len(load_trajectories(set_dir, **expected_manifest(recipe, teacher_dir, records))) == 6

    other = load_recipe(recipe_file(tmp_path, teacher_dir, "other", train_size=6, block_length=4))
    with pytest.raises(ValueError, match=r"decoder\.block_length: the set has 8, expected 4"):
        load_trajectories(set_dir, **expected_manifest(other, teacher_dir, records))
    with pytest.raises(ValueError, match="data_hash"):
        load_trajectories(set_dir, **expected_manifest(recipe, teacher_dir, records[:5]))
    retrained = tmp_path / "retrained"
    torch.manual_seed(1)
    save_teacher(tiny_teacher(32, 64, 2, 2, 1, 64), retrained)
    with pytest.raises(ValueError, match=r"teacher_fingerprint: the set has 'stat:[0-9a-f]{64}', expected 'stat:"):
        load_trajectories(set_dir, **expected_manifest(recipe, retrained, records))
    # The same teacher named by its weights' sha256 is another fingerprint too: the mode is part of the identity.
    strict = load_recipe(recipe_file(tmp_path, teacher_dir, "strict", train_size=6), ["run.strict_hash=true"])
    with pytest.raises(ValueError, match=r"teacher_fingerprint: the set has 'stat:[0-9a-f]{64}', expected 'sha256:"):
        load_trajectories(set_dir, **expected_manifest(strict, teacher_dir, records))
    # A set of format 1 (which named its teacher by `teacher_hash`) is refused by its format, never misread.
    old = tmp_path / "format-1"
    shutil.copytree(set_dir, old)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    manifest["format"], manifest["teacher_hash"] = 1, manifest.pop("teacher_fingerprint")
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match: format: the set has 1, expected 2"):
        load_trajectories(old, **expected_manifest(recipe, teacher_dir, records))


def test_wrong_tokenizer_is_refused(tmp_path, teacher_dir):
    recipe, _, _ = generate(tmp_path, teacher_dir, train_size=6)
    # Same weights, another chat format: the bug of a trajectory recorded on a differently formatted prompt.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(teacher_dir, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|assistant|>", "<|assistant|>\n"))
    write_manifest(other)  # a folder written so, not one changed behind its manifest's back
    expected = expected_manifest(recipe, other, records_of(recipe))
    with pytest.raises(ValueError, match=r"made with a different tokenizer\): tokenizer_hash"):
        load_trajectories(Path(recipe.run.output_dir) / SET_DIR, **expected)


def test_truncated_files_are_detected_and_shards_decoded_again(tmp_path, teacher_dir, capsys):
    recipe, _, rows = generate(tmp_path, teacher_dir, train_size=6, temperatures=[0.0])
    rows = rows.to_list()  # read before the memory-mapped file is cut
    out = Path(recipe.run.output_dir)
    data_file = next((out / SET_DIR).glob("*.arrow"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        load_trajectories(out / SET_DIR)
    # A manifest that agrees with the cut file still cannot make it load: the Arrow error is reported clearly.
    manifest = json.loads((out / SET_DIR / MANIFEST_FILE).read_text())
    manifest["files"] = {data_file.name: sha256_of([data_file], named=True)}
    (out / SET_DIR / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"cannot read .*: Expected to be able to read"):
        load_trajectories(out / SET_DIR)

    # The next run writes the broken set again, decodes the truncated shard again, and the set comes out whole.
    shard = out / SHARDS_DIR / shard_name(1, 3)
    shard_file = next(shard.glob("*.arrow"))
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    capsys.readouterr()
    summary = trajectories_command(recipe)
    printed = capsys.readouterr().out
    assert f"writing {SET_DIR} again" in printed and f"writing {shard.name} again" in printed
    assert summary["decoded_now"] == 2
    again = load_trajectories(out / SET_DIR)
    assert again.to_list() == rows


# ----------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL, and two ranks


SCALE = dict(train_size=96, shards=24, batch_size=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir):
    _, _, rows = generate(tmp_path_factory.mktemp("uninterrupted"), teacher_dir, **SCALE)
    return rows


def test_sigkill_three_times_then_resume_equals_uninterrupted_run(tmp_path, teacher_dir, uninterrupted):
    path = recipe_file(tmp_path, teacher_dir, **SCALE)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "distill.cli", "trajectories", str(path)]

    def finished_shards() -> int:
        return len(list((out / SHARDS_DIR).glob(f"*/{COMPLETE_MARKER}")))

    for kill in range(3):
        before = finished_shards()
        process = subprocess.Popen(command, cwd=REPO, env=child_env(tmp_path), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while finished_shards() <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, f"kill {kill}: the run ended before it was killed"
        assert before < finished_shards() < SCALE["shards"], f"kill {kill} was not mid-run"
        assert not (out / SET_DIR).exists()

    run_launched(command, tmp_path)
    resumed = load_from_disk(str(out / SET_DIR))
    assert resumed["sample_id"] == uninterrupted["sample_id"]
    assert resumed["order"] == uninterrupted["order"]
    assert resumed.to_list() == uninterrupted.to_list()


def test_two_ranks_under_torchrun_equal_one_rank(tmp_path, teacher_dir, uninterrupted):
    path = recipe_file(tmp_path, teacher_dir, **SCALE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "distill.cli", "trajectories", str(path)]
    done = run_launched(command, tmp_path)
    assert done.stdout.count("[trajectories]") == 1  # rank 0 reports for both
    two_ranks = load_from_disk(str(tmp_path / "run" / SET_DIR))
    assert two_ranks.to_list() == uninterrupted.to_list()


def test_run_stage_writes_the_set(tmp_path, teacher_dir):
    path = recipe_file(tmp_path, teacher_dir, train_size=6, temperatures=[0.0])
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run"
    assert len(load_trajectories(out / SET_DIR)) == 6
    assert "trajectories" in json.loads((out / "summary.json").read_text())["stage_seconds"]
