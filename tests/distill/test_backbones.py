"""Every stage on each published architecture (LLaDA, Dream, Dimple) at a tiny random config with its published chat
format: trajectories, two-rank distillation under ZeRO-2 and ZeRO-3 (full and LoRA with the backbone's default
targets), and export verified in a fresh process that cannot import fewstep (logits and `diffusion_generate`).
A Dimple export also decodes an image prompt there exactly as fewstep's engine does.

One module-scoped fixture per backbone saves the teacher and runs the two-rank worker (`distill_worker.py`) once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import load_from_disk
from transformers import GenerationConfig

from distill.decoding import decode, decode_settings, left_pad
from distill.export import export_run
from distill.recipe import DecoderConfig, StudentConfig, load_recipe
from distill.trajectories import SET_DIR, trajectories_command
from distill.verify import FP32_ATOL
from students.build import build_student
from teachers.interface import BACKBONES, load_teacher, save_teacher
from teachers.vision import VisionInputs
from tests.builders import BACKBONE_NAMES, tiny_teacher
from tests.distill.distill_worker import worker_command
from tests.launch import run_launched

COMBOS = ["zero2-full", "zero2-lora", "zero3-full", "zero3-lora"]


@pytest.fixture(scope="module", params=BACKBONE_NAMES)
def backbone_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(backbone, teacher dir, two-rank runs dir) for a tiny random teacher of that backbone."""
    backbone = request.param
    root = tmp_path_factory.mktemp(backbone)
    torch.manual_seed(0)
    save_teacher(tiny_teacher(32, 64, 1, 2, 1, 128, backbone=backbone, published_chat=True), root / "teacher")
    runs = root / "runs"
    run_launched(worker_command(root / "teacher", runs, "--combos", *COMBOS), runs, timeout=600)
    return backbone, root / "teacher", runs


def test_the_saved_teacher_keeps_the_published_layout(backbone_run):
    backbone, teacher_dir, _ = backbone_run
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["model_type"] == BACKBONES[backbone].model_type
    assert config["architectures"] == [BACKBONES[backbone].model_class.__name__]
    teacher = load_teacher(None, teacher_dir)
    assert teacher.name == backbone and teacher.end_token_id != teacher.eos_token_id


def test_default_lora_targets_are_the_decoder_blocks_linear_layers(backbone_run):
    backbone, teacher_dir, _ = backbone_run
    student = build_student(load_teacher(None, teacher_dir), StudentConfig(kind="lora"))
    adapted = {
        name.removesuffix(".lora_A.default") for name, _ in student.named_modules() if name.endswith("lora_A.default")
    }
    kinds = {name.rsplit(".", 1)[-1] for name in adapted}
    expected = {"llada": {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"}}
    assert kinds == expected.get(
        backbone, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    # Never the output head (LLaDA's is also named ff_out) nor Dimple's vision tower.
    assert all(("blocks." in name or "layers." in name) and "visual" not in name for name in adapted)


def test_trajectories_generate(backbone_run, tmp_path):
    _, teacher_dir, _ = backbone_run
    tree = {
        "run": {"name": "traj", "output_dir": str(tmp_path / "traj"), "stages": ["trajectories"]},
        "teacher": {"path": str(teacher_dir)},
        "data": {"max_response_tokens": 24, "tasks": [{"name": "addition", "train_size": 6, "eval_size": 2}]},
        "trajectories": {"block_length": 8, "batch_size": 3, "shards": 2},
        "logging": {"progress": False},
    }
    (tmp_path / "traj.yaml").write_text(yaml.safe_dump(tree))
    summary = trajectories_command(load_recipe(tmp_path / "traj.yaml"))
    rows = load_from_disk(str(tmp_path / "traj" / SET_DIR))
    assert summary["samples"] == len(rows) == 6
    for row in rows:
        # One token per forward: the committed positions' steps are exactly 0..nfe-1.
        assert sorted(step for step in row["order"] if step >= 0) == list(range(row["nfe"]))


@pytest.mark.parametrize("combo", COMBOS)
def test_two_rank_distillation_runs_under_zero2_and_zero3(backbone_run, combo):
    _, _, runs = backbone_run
    for rank in (0, 1):
        result = json.loads((runs / f"result-{combo}-rank{rank}.json").read_text())
        assert result["world_size"] == 2 and result["summary"]["step"] == 2
        assert result["teacher_weights_loaded"] is False  # trajectory distillation needs no teacher forward
        assert result["student_partitioned"] is combo.startswith("zero3")
        if combo.startswith("zero3"):  # built under zero.Init, from each backbone's published layout
            assert result["built_partitioned"]["partitioned"] and result["built_partitioned"]["equal_to_checkpoint"]
    losses = [
        json.loads(line)["loss"] for line in (runs / combo / "distill" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("combo", ["zero3-full", "zero2-lora"])
def test_export_verifies_without_fewstep(backbone_run, combo, tmp_path):
    backbone, _, runs = backbone_run
    out = export_run(runs / combo, tmp_path / "export")
    result = json.loads((out / "verify.json").read_text())
    assert result["ok"] and result["child"]["fewstep_modules_loaded"] == []
    assert result["child"]["model_class"] == BACKBONES[backbone].model_class.__name__
    assert result["logits"]["max_abs_diff"] <= FP32_ATOL and result["tokenizer"]["prompts_equal"]
    assert result["decode"]["tokens_equal"] and result["decode"]["nfe_equal"] and result["decode"]["order_equal"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == BACKBONES[backbone].model_type  # the published family: loads where it loaded


IMAGE_CHILD = r"""
import sys, torch
from transformers import AutoModel
job = torch.load(sys.argv[1])
model = AutoModel.from_pretrained(job["folder"], trust_remote_code=True).eval()
out = model.diffusion_generate(job["ids"], attention_mask=job["mask"], pixel_values=job["pixel_values"],
                               image_grid_thw=job["image_grid_thw"])
torch.save({"sequences": out.sequences, "nfe": out.nfe, "order": out.order}, sys.argv[2])
"""


def test_dimple_export_decodes_an_image_prompt_as_the_engine_does(tmp_path):
    # A tiny Dimple with its vision tower; a 28x28 image is one 2x2 patch grid merged into one image token.
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 128, backbone="dimple", published_chat=True)
    with torch.no_grad():
        teacher.model.get_output_embeddings().weight.mul_(30)  # spread confidences over (0, 1)
    save_teacher(teacher, tmp_path / "dimple")
    teacher = load_teacher(None, tmp_path / "dimple")
    token = teacher.tokenizer.convert_tokens_to_ids
    image = [token("<|vision_start|>"), token("<|image_pad|>"), token("<|vision_end|>")]
    prompt = teacher.encode_prompt("what is it?").ids
    prompt = prompt[:2] + image + prompt[2:]
    pixel_values = torch.randn(4, 3 * 2 * 14 * 14)
    image_grid_thw = torch.tensor([[1, 2, 2]])
    config = DecoderConfig(name="confident", threshold=0.5, block_length=8, cache="prompt")
    images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
    expected = decode(teacher, [prompt], config, 16, vision=[VisionInputs(pixel_values, image_grid_thw)])
    # The image reaches the model: the response logits move with the pixels.
    canvas = torch.tensor([prompt + [teacher.mask_token_id] * 16])
    start = len(prompt)
    seen = teacher.forward(canvas, start=start, **images)
    blank = teacher.forward(
        canvas, start=start, pixel_values=torch.zeros_like(pixel_values), image_grid_thw=image_grid_thw
    )
    assert (seen - blank).abs().max() > 1e-3

    generation = GenerationConfig()
    generation.diffusion = decode_settings(teacher, config, 16).to_dict()
    generation.eos_token_id, generation.mask_token_id = [teacher.end_token_id], teacher.mask_token_id
    generation.save_pretrained(tmp_path / "dimple")
    ids, mask = left_pad([prompt], teacher.pad_token_id)
    torch.save({"folder": str(tmp_path / "dimple"), "ids": ids, "mask": mask, **images}, tmp_path / "job.pt")
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site), HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-S", "-c", IMAGE_CHILD, str(tmp_path / "job.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["sequences"][:, ids.shape[1] :], expected.tokens)
    assert torch.equal(out["nfe"], expected.nfe) and torch.equal(out["order"], expected.order)
