"""Export and verification on real two-rank DeepSpeed checkpoints (ZeRO-2 and ZeRO-3, full and LoRA students).

The runs are the session fixture `two_ranks` (conftest.py): `two_ranks/<combo>` is a run directory (recipe.yaml,
distill/checkpoints/step-00000002, student/) and `two_ranks/full-<combo>.pt` the weights the trainer gathered
through DeepSpeed at the end of training, the training-side reference that consolidation must reproduce.
Verification starts a fresh Python process that cannot import fewstep; those tests are the slow ones here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from distill.cli import main
from distill.consolidate import CheckpointError, consolidate, load_student
from distill.export import export_run, verify_folder
from distill.recipe import RecipeError, load_recipe
from distill.trainer import checkpoint_tag
from distill.verify import BF16_RTOL, FP32_ATOL, VERIFY_FILE, VerifyError
from students.build import build_student
from teachers.interface import load_teacher
from teachers.manifest import write_manifest

EXPORTED = ["zero2-full", "zero2-lora", "zero3-full", "zero3-lora"]
STEP = checkpoint_tag(2)
SMALL_SHARDS = "20KB"  # the tiny model is ~100 kB: several shards and an index


def training_student(two_ranks: Path, teacher_dir: Path, combo: str) -> torch.nn.Module:
    """The student as training left it: rebuilt, with the weights DeepSpeed gathered (LoRA unmerged)."""
    recipe = load_recipe(two_ranks / combo / "recipe.yaml")
    student = build_student(load_teacher(None, teacher_dir), recipe.student)
    student.load_state_dict(torch.load(two_ranks / f"full-{combo}.pt"))
    return student.eval()


def inputs(teacher_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = load_teacher(None, teacher_dir)
    prompt = teacher.encode_prompt("12+34=").ids
    ids = torch.tensor([prompt + [teacher.mask_token_id] * 8 + teacher.encode_response("46")])
    return ids, torch.ones_like(ids)


def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def copy_run(two_ranks: Path, combo: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(two_ranks / combo, tmp_path / combo))


@pytest.fixture(scope="module")
def unverified(two_ranks, tmp_path_factory) -> Path:
    """An unverified export of the ZeRO-3 full run in small shards; tests that damage it work on copies."""
    out = tmp_path_factory.mktemp("unverified") / "export"
    return export_run(two_ranks / "zero3-full", out, verify=False, max_shard_size=SMALL_SHARDS)


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("combo", EXPORTED)
def test_export_round_trip_equals_the_training_side_student(combo, two_ranks, teacher_dir, tmp_path):
    checkpoint = two_ranks / combo / "distill" / "checkpoints" / STEP
    state, facts = consolidate(checkpoint)
    assert facts == {"zero_stage": int(combo[4]), "world_size": 2}
    gathered = torch.load(two_ranks / f"full-{combo}.pt")
    assert state.keys() == gathered.keys() and all(torch.equal(state[name], gathered[name]) for name in state)

    out = export_run(two_ranks / combo, tmp_path / "export", verify=False, max_shard_size=SMALL_SHARDS)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    for reference in config["auto_map"].values():
        assert (out / f"{reference.split('.')[0]}.py").is_file()
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    teacher = load_teacher(None, teacher_dir)
    assert model.state_dict().keys() == teacher.model.state_dict().keys()  # LoRA merged into plain weights
    ids, mask = inputs(teacher_dir)
    reference = logits(training_student(two_ranks, teacher_dir, combo), ids, mask)
    assert (logits(model, ids, mask) - reference).abs().max() <= FP32_ATOL

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert (
        generation["mask_token_id"] == teacher.mask_token_id and generation["eos_token_id"][0] == teacher.end_token_id
    )
    # No report in these runs: the recipe's eval decoder, for the 8-token canvas.
    assert generation["diffusion"]["decoder"] == "low_confidence" and generation["diffusion"]["gen_length"] == 8
    provenance = json.loads((out / "export.json").read_text())
    assert provenance["checkpoint"]["step"] == 2 and provenance["checkpoint"]["zero_stage"] == int(combo[4])
    card = (out / "README.md").read_text()
    assert "diffusion_generate" in card and str(teacher_dir.resolve()) in card and "```yaml" in card
    assert not (out / "verify.json").exists() and not list(tmp_path.glob(".export-*"))


def test_verified_export_reloads_and_decodes_without_fewstep(two_ranks, tmp_path):
    out = export_run(two_ranks / "zero3-lora", tmp_path / "export", max_shard_size=SMALL_SHARDS)
    result = json.loads((out / "verify.json").read_text())
    assert result["ok"] and result["failures"] == []
    assert result["child"]["model_class"] == "DreamModel" and result["child"]["fewstep_modules_loaded"] == []
    assert result["logits"]["measure"] == "max_abs_diff" and result["logits"]["max_abs_diff"] <= FP32_ATOL
    assert result["tokenizer"]["prompts_equal"] and result["decode"]["prompts"] == 4
    assert result["decode"]["tokens_equal"] and result["decode"]["nfe_equal"] and result["decode"]["order_equal"]


def test_unmerged_lora_export_keeps_the_teacher_weights_and_a_peft_adapter(two_ranks, teacher_dir, tmp_path):
    out = export_run(two_ranks / "zero2-lora", tmp_path / "export", merge_lora=False)
    assert (out / "adapter" / "adapter_config.json").is_file()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    base = load_file(out / "model.safetensors")
    teacher = load_teacher(None, teacher_dir).model.state_dict()
    assert base.keys() == teacher.keys() and all(torch.equal(base[name], teacher[name]) for name in base)
    result = json.loads((out / "verify.json").read_text())  # the child loaded base + adapter with peft
    assert result["ok"] and result["files"]["adapter"] and result["logits"]["max_abs_diff"] <= FP32_ATOL


def test_bf16_export_is_verified_within_the_documented_tolerance(two_ranks, tmp_path):
    out = export_run(two_ranks / "zero2-full", tmp_path / "export", dtype="bf16")
    with open(out / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {"BF16"}
    result = json.loads((out / "verify.json").read_text())
    assert result["logits"]["measure"] == "relative_error" and result["logits"]["tolerance"] == BF16_RTOL
    assert 0 < result["logits"]["relative_error"] <= BF16_RTOL and result["decode"]["tokens_equal"]


# ----------------------------------------------------------------------------------------------------------------
# Refusals


def test_checkpoint_without_its_complete_marker_is_refused(two_ranks, tmp_path):
    run = copy_run(two_ranks, "zero2-full", tmp_path)
    (run / "distill" / "checkpoints" / STEP / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000002/COMPLETE: missing, the save of step 2 was interrupted"):
        export_run(run, tmp_path / "a", checkpoint=2, verify=False)
    with pytest.raises(CheckpointError, match="no complete distillation checkpoint"):
        export_run(run, tmp_path / "b", verify=False)
    with pytest.raises(CheckpointError, match="no checkpoint of step 7; complete checkpoints: none"):
        export_run(run, tmp_path / "c", checkpoint=7, verify=False)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a-*"))


def test_truncated_or_missing_checkpoint_files_are_refused(two_ranks, tmp_path):
    run = copy_run(two_ranks, "zero3-full", tmp_path)
    shard = run / "distill" / "checkpoints" / STEP / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # The checkpoint's manifest names the file; with no intact checkpoint left there is nothing to fall back to.
    with pytest.raises(CheckpointError, match=f"{shard}: truncated or replaced .*; no intact checkpoint is left"):
        export_run(run, tmp_path / "out", verify=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: missing, .*MANIFEST.json lists it"):
        export_run(run, tmp_path / "out", verify=False)
    write_manifest(shard.parent, exclude={"COMPLETE"})  # a manifest without it: the ZeRO-3 layout still needs it
    with pytest.raises(CheckpointError, match=f"{shard}: missing, ZeRO-3 over 2 ranks needs it"):
        export_run(run, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_recipes_student_are_refused(two_ranks, tmp_path):
    run = two_ranks / "zero2-full"
    recipe = load_recipe(run / "recipe.yaml", ["student.kind=lora"])
    with pytest.raises(CheckpointError, match="its weights do not fit the 'lora' student the recipe builds: missing"):
        load_student(recipe, run, run / "distill" / "checkpoints" / STEP)


def test_verify_refuses_a_truncated_safetensors_file_and_a_missing_shard(unverified, tmp_path):
    truncated = Path(shutil.copytree(unverified, tmp_path / "truncated"))
    shard = sorted(truncated.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(VerifyError, match=f"{shard}: truncated"):
        verify_folder(truncated)
    missing = Path(shutil.copytree(unverified, tmp_path / "missing"))
    shard = sorted(missing.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(VerifyError, match=f"{shard}: missing shard listed in model.safetensors.index.json"):
        verify_folder(missing)


def test_an_existing_export_is_replaced_only_when_asked(two_ranks, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_run(two_ranks / "zero2-full", out, verify=False)
    assert (out / "mine.txt").read_text() == "keep me"
    export_run(two_ranks / "zero2-full", out, verify=False, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # no staging or replaced folder left


# ----------------------------------------------------------------------------------------------------------------
# Command line and the run's export stage


def test_export_and_verify_commands_exit_codes(two_ranks, unverified, tmp_path, capsys):
    run, out = str(two_ranks / "zero2-full"), str(tmp_path / "export")
    with pytest.raises(SystemExit) as caught:
        main(["export", run, "--out", out, "--checkpoint", "abc"])
    assert caught.value.code == 2 and "expected latest or an optimizer step" in capsys.readouterr().err
    assert main(["export", run, "--out", out, "--max-shard-size", "12XB", "--no-verify"]) == 2
    assert "export.max_shard_size" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--out", out]) == 1
    assert main(["export", run, "--out", out, "--checkpoint", "7"]) == 1
    assert "no checkpoint of step 7" in capsys.readouterr().err
    assert main(["export", run, "--out", out, "--no-verify", "--max-shard-size", SMALL_SHARDS]) == 0
    assert main(["export", run, "--out", out, "--no-verify"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err

    # A copy of a good export verifies. Made to import fewstep, its code is no longer fewstep's: it runs only with
    # the user's opt-in (and a manifest rewritten for it), and then the fresh process refuses the import.
    assert main(["verify", out]) == 0
    assert "diffusion_generate == fewstep's decoder on 4 prompts" in capsys.readouterr().out
    modeling = Path(out) / "modeling_dream.py"
    modeling.write_text(modeling.read_text().replace("import torch\n", "import distill  # noqa\nimport torch\n", 1))
    assert main(["verify", out]) == 2
    assert "modeling_dream.py: differs from fewstep's" in capsys.readouterr().err
    write_manifest(Path(out), exclude={VERIFY_FILE})
    assert main(["verify", out, "--trust-remote-code"]) == 1
    assert "distill is hidden: the export must load without fewstep" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == 1


def test_run_stage_exports_the_student_with_the_reports_best_decoder(two_ranks, tmp_path):
    run = copy_run(two_ranks, "zero2-lora", tmp_path)
    overrides = [
        f"run.output_dir={run}",
        "run.stages=[eval, export]",
        "data.tasks.0.train_size=8",
        "data.tasks.0.eval_size=4",
        "eval.rows=[student]",
        "eval.batch_size=4",
        "eval.decoder.name=confident",
        "eval.decoder.cache=none",
        "eval.decoder.sweep=[0.5, 1.0]",
    ]
    assert main(["run", str(run / "recipe.yaml"), *overrides]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stage_seconds"])[-2:] == ["eval", "export"] and summary["checkpoints"]["export"] == str(
        run / "export"
    )
    out = run / "export"
    assert json.loads((out / "verify.json").read_text())["ok"]
    diffusion = json.loads((out / "generation_config.json").read_text())["diffusion"]
    assert diffusion["decoder"] == "confident" and diffusion["threshold"] in (0.5, 1.0)
    card = (out / "README.md").read_text()
    assert "## Evaluation (the run's AUP report)" in card and "| student | confident |" in card
    assert "![accuracy vs TPF on addition](report-addition.png)" in card and (out / "report-addition.png").is_file()
    # A rerun replaces the run's own export (export.overwrite defaults to true for the stage).
    assert main(["run", str(run / "recipe.yaml"), *overrides, "run.stages=[export]", "export.verify=false"]) == 0
    assert not (out / "verify.json").exists()


def test_export_section_is_validated_with_the_recipe():
    recipe = load_recipe("recipes/quickstart.yaml", ["run.stages=[distill, eval, export]", "export.dtype=bf16"])
    assert recipe.run.stages[-1] == "export" and recipe.export.dtype == "bf16"
    assert recipe.export.checkpoint == "latest" and recipe.export.out_dir is None and recipe.export.overwrite
    for override, field in (
        ("export.max_shard_size=5XB", "export.max_shard_size"),
        ("export.checkpoint=0", "export.checkpoint"),
    ):
        with pytest.raises(RecipeError, match=field):
            load_recipe("recipes/quickstart.yaml", [override])
