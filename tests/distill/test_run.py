"""End to end: `distill run` and `distill eval` on a tiny teacher for a few steps (real DeepSpeed, datasets, wandb)."""

import json

import yaml
from datasets import load_from_disk
from transformers import AutoConfig, AutoModel

from distill.cli import main

TINY = [
    "teacher.pretrain.model.hidden_size=32",
    "teacher.pretrain.model.intermediate_size=64",
    "teacher.pretrain.model.num_hidden_layers=1",
    "teacher.pretrain.model.num_attention_heads=2",
    "teacher.pretrain.model.num_key_value_heads=1",
    "teacher.pretrain.ar.max_steps=2",
    "teacher.pretrain.ar.micro_batch_size=4",
    "teacher.pretrain.diffusion.max_steps=2",
    "teacher.pretrain.diffusion.micro_batch_size=4",
    "data.tasks.0.train_size=40",
    "data.tasks.0.eval_size=6",
    "eval.batch_size=4",
    "logging.progress=false",
]


def run_tiny(tmp_path, name, *extra):
    out = tmp_path / name
    args = ["run", "recipes/teacher-tiny.yaml", f"run.output_dir={out}", f"run.cache_dir={tmp_path / 'cache'}"]
    assert main(args + TINY + list(extra)) == 0
    return out


def test_run_writes_every_artifact_and_reuses_the_cached_teacher(tmp_path, capsys):
    out = run_tiny(tmp_path, "first")
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["teacher"]["pretrain"]["ar"]["max_steps"] == 2 and resolved["run"]["output_dir"] == str(out)
    assert len(load_from_disk(str(out / "data" / "addition"))["train"]) == 40

    assert AutoConfig.from_pretrained(out / "ar-baseline").causal is True
    assert AutoConfig.from_pretrained(out / "teacher").causal is False
    AutoModel.from_pretrained(out / "teacher")
    for phase in ("ar", "diffusion"):
        lines = (out / f"pretrain-{phase}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines][-1] == 2

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"data", "teacher", "eval"}
    rows = {(result["row"], result["task"]) for result in summary["results"]}
    assert rows == {("teacher", "addition"), ("ar-baseline", "addition")}
    for result in summary["results"]:
        assert 0 <= result["accuracy"] <= 100 and result["nfe"] > 0 and result["tpf"] > 0
    logs = [json.loads(line) for line in (out / "eval" / "teacher" / "addition.jsonl").read_text().splitlines()]
    # One line per eval sample at every point of the adaptive sweep, which starts at one token per forward.
    knobs = list(dict.fromkeys(line["knob"] for line in logs))
    assert knobs[0] == 24 and len(logs) == 6 * len(knobs)
    assert set(logs[0]) >= {"prompt", "output", "answer", "correct", "nfe"}
    capsys.readouterr()

    # Same teacher + data + seed in another output dir: copied from the cache, no training phase runs.
    second = run_tiny(tmp_path, "second")
    assert "reusing cached teacher" in capsys.readouterr().out
    assert not (second / "pretrain-ar").exists()
    assert (
        json.loads((second / "pretrain.json").read_text())["key"]
        == json.loads((out / "pretrain.json").read_text())["key"]
    )

    # A different data section is a different teacher: it trains.
    third = run_tiny(tmp_path, "third", "data.tasks.0.max_digits=2")
    assert (third / "pretrain-ar").exists()

    # `distill eval` on a checkpoint prints accuracy, NFE and TPF per task.
    capsys.readouterr()
    code = main(
        ["eval", "recipes/teacher-tiny.yaml", f"run.output_dir={out}", "--checkpoint", str(out / "teacher"), *TINY]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "accuracy" in printed and "NFE" in printed and "TPF" in printed


def test_eval_rejects_a_missing_checkpoint(tmp_path, capsys):
    code = main(["eval", "recipes/teacher-tiny.yaml", "--checkpoint", str(tmp_path / "nothing"), *TINY])
    assert code == 1
    assert "not a model directory" in capsys.readouterr().err


def test_full_pipeline_teacher_trajectories_student_eval(tmp_path):
    out = run_tiny(
        tmp_path,
        "pipeline",
        "run.stages=[teacher, trajectories, distill, eval]",
        "trajectories.block_length=8",
        "trajectories.shards=2",
        "trajectories.temperatures=[0.0]",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "distill.curriculum.windows=[8, 24]",
        "eval.rows=[teacher, ar-baseline, student]",
    )
    manifest = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert manifest["samples"] == 40
    assert AutoModel.from_pretrained(out / "student") is not None
    distill_metrics = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in distill_metrics][-1] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stage_seconds"]) == ["data", "teacher", "trajectories", "distill", "eval"]
    assert {result["row"] for result in summary["results"]} == {"teacher", "ar-baseline", "student"}


def test_stale_checkpoints_and_trajectories_from_another_teacher_are_refused(tmp_path, capsys):
    out = run_tiny(
        tmp_path,
        "mismatch",
        "run.stages=[teacher, trajectories]",
        "trajectories.block_length=8",
        "trajectories.temperatures=[0.0]",
    )
    args = ["run", "recipes/teacher-tiny.yaml", f"run.output_dir={out}", "run.cache_dir=null", *TINY]
    changed = ["teacher.pretrain.diffusion.lr=0.01"]
    # Another learning rate in the same directory: the diffusion phase's checkpoints belong to another config.
    capsys.readouterr()
    assert main(args + changed + ["run.stages=[teacher]"]) == 1
    assert "written by a different configuration" in capsys.readouterr().err
    # Retrained from scratch, the teacher's weights (hence its fingerprint) change while the data stays the same...
    changed.append("teacher.pretrain.diffusion.resume=never")
    assert main(args + changed + ["run.stages=[teacher]"]) == 0
    capsys.readouterr()
    # ...so the old trajectory set no longer matches and distillation refuses it.
    distill = ["run.stages=[distill]", "trajectories.block_length=8", "trajectories.temperatures=[0.0]"]
    code = main(args + changed + distill + ["train.max_steps=1", "distill.curriculum.windows=[8]"])
    err = capsys.readouterr().err
    assert code == 1 and "trajectory manifest does not match" in err and "teacher_fingerprint" in err


def test_quickstart_recipe_runs_every_stage_for_a_few_steps(tmp_path):
    out = tmp_path / "quickstart"
    args = ["run", "recipes/quickstart.yaml", f"run.output_dir={out}", f"run.cache_dir={tmp_path / 'cache'}", *TINY]
    # A teacher of 2 + 2 steps gets every answer wrong, so keep its trajectories anyway.
    extra = ["train.max_steps=2", "train.micro_batch_size=4", "trajectories.shards=2", "trajectories.keep=all"]
    assert main(args + extra) == 0
    assert json.loads((out / "trajectories" / "manifest.json").read_text())["samples"] == 40
    assert json.loads((out / "distill" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stage_seconds"]) == ["data", "teacher", "trajectories", "distill", "eval", "export"]
    assert (out / "export" / "verify.json").is_file()
    points = {(result["row"], result["decoder"]) for result in summary["results"]}
    assert {("student", "confident"), ("student", "multi_block"), ("teacher", "confident")} <= points


def test_vision_quickstart_carries_images_through_every_stage_and_verifies_its_export_on_them(tmp_path):
    from distill.trajectories import load_trajectories

    out = tmp_path / "quickstart-vision"
    args = ["run", "recipes/quickstart-vision.yaml", f"run.output_dir={out}", f"run.cache_dir={tmp_path / 'cache'}"]
    extra = ["train.max_steps=2", "train.micro_batch_size=4", "trajectories.shards=2", "trajectories.keep=all"]
    extra += ["trajectories.max_samples=8", "eval.max_samples=4", "eval.decoder.sweep=[1.0]", "eval.decoders=[]"]
    assert main(args + TINY + extra) == 0
    rows = load_trajectories(out / "trajectories")
    assert all(len(digests) == 1 for digests in rows["image_sha256"])  # one image per colour_digits prompt
    assert json.loads((out / "distill" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    # The export holds the image processor and decodes image prompts without fewstep as fewstep does.
    assert (out / "export" / "preprocessor_config.json").is_file()
    verified = json.loads((out / "export" / "verify.json").read_text())
    assert verified["ok"] and verified["decode"]["image_prompts"] == verified["decode"]["prompts"] == 4
    assert verified["decode"]["tokens_equal"] and verified["decode"]["order_equal"]


def test_sdtt_recipe_distills_without_trajectories_across_a_round_boundary(tmp_path):
    out = tmp_path / "sdtt"
    args = ["run", "recipes/sdtt-tiny.yaml", f"run.output_dir={out}", f"run.cache_dir={tmp_path / 'cache'}", *TINY]
    assert (
        main(args + ["train.max_steps=2", "train.log_every=1", "train.micro_batch_size=4", "targets.steps_per_round=1"])
        == 0
    )
    assert not (out / "trajectories").exists()
    lines = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [(line["sdtt_round"], line["sdtt_teacher_steps"]) for line in lines] == [(0, 24), (1, 12)]
    assert (out / "distill" / "sdtt-rounds" / "round-01" / "round.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    steps = {result["knob"] for result in summary["results"] if result["row"] == "student"}
    assert steps == {1, 2, 3, 4, 6, 8, 12, 24}  # the pinned sweep runs down to one forward
    # Round 1's starting teacher is scored too, and the curve pairs each round's teacher with its student.
    assert {result["row"] for result in summary["results"]} == {"teacher", "ar-baseline", "student", "sdtt-round-01"}
    curve = json.loads((out / "eval" / "sdtt_curve.json").read_text())
    assert [(p["round"], p["teacher"], p["student"]) for p in curve] == [
        (0, "teacher", "sdtt-round-01"),
        (1, "sdtt-round-01", "sdtt-round-02"),
        (2, "sdtt-round-02", "student"),
    ]
    assert curve[0]["teacher_accuracy"] is not None and curve[0]["student_accuracy"] is not None
    assert curve[1]["student_accuracy"] is None  # round 2 never started in these 2 steps


def _report_row(name, decoder_name, points):
    return {"name": name, "decoder_name": decoder_name, "points": [{"knob": k, "accuracy": a} for k, a in points]}


def test_sdtt_curve_pairs_each_round_teacher_with_its_student_at_half_the_steps():
    from distill.recipe import load_recipe
    from distill.run import sdtt_curve, sdtt_round_rows

    recipe = load_recipe("recipes/sdtt-tiny.yaml", ["targets.teacher_steps=24", "targets.rounds=3"])
    schedule = sdtt_round_rows(recipe)
    assert [(s["teacher"], s["teacher_steps"], s["student"], s["student_steps"]) for s in schedule] == [
        ("teacher", 24, "sdtt-round-01", 12),
        ("sdtt-round-01", 12, "sdtt-round-02", 6),
        ("sdtt-round-02", 6, "student", 3),
    ]
    assert schedule[0]["teacher_path"] is None and schedule[1]["teacher_path"].endswith("sdtt-rounds/round-01")
    rows = [
        _report_row("teacher", "low_confidence", [(24, 100.0), (12, 7.0)]),
        _report_row("sdtt-round-01", "low_confidence", [(12, 99.0), (6, 40.0)]),
        _report_row("sdtt-round-02", "confident", [(6, 50.0)]),  # another decoder: not a fixed-step point
        _report_row("student", "low_confidence", [(3, 97.5)]),
    ]
    curve = sdtt_curve({"tasks": [{"task": "addends", "rows": rows}]}, schedule)
    assert [(p["teacher_accuracy"], p["student_accuracy"], p["student_minus_teacher"]) for p in curve] == [
        (100.0, 99.0, -1.0),
        (99.0, None, None),
        (None, 97.5, None),
    ]


def test_summary_lines_show_each_rows_fastest_point_within_two_points_of_its_best():
    from distill.run import summary_lines

    point = {"task": "addends", "decoder": "confident", "nfe": 1.0, "tokens_per_s": 1.0, "samples": 2, "knob": 0.5}
    results = [
        point | {"row": "student", "aup": 500.0, "accuracy": 99.0, "tpf": 2.0},
        point | {"row": "student", "aup": 500.0, "accuracy": 97.5, "tpf": 6.0},
        point | {"row": "student", "aup": 500.0, "accuracy": 90.0, "tpf": 12.0},
    ]
    summary = {
        "run": "x",
        "total_seconds": 12.0,
        "stage_seconds": {"data": 1.0, "eval": 11.0},
        "results": results,
        "checkpoints": {"student": "runs/x/student"},
    }
    lines = summary_lines(summary)
    assert lines[0] == "x: 12 s (data 1 s, eval 11 s)"
    assert lines[2].split() == ["addends", "student", "confident", "500.0", "97.50%", "6.00"]
    assert lines[-1] == "student: runs/x/student"
