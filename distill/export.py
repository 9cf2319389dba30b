"""`distill export`: a distilled student as a Hugging Face folder that loads and decodes where fewstep is not installed.

run dir -> the chosen complete checkpoint read back as the student that wrote it (`distill/consolidate.py`: fp32
weights from any ZeRO stage, loaded strictly into the rebuilt student) -> the decoding defaults
(`students/defaults.py`) -> LoRA merged, or kept as a peft adapter -> the folder written beside `out`, verified
(`distill/verify.py`) and renamed into place. The module runs past 400 lines on purpose: the folder, its model
card and the refusals that keep a run safe from its own export (`check_out`, the staging clean-up) read in one place.

The folder:

    config.json + *.py             the model config with `auto_map`, and the modeling/configuration files it names
    model.safetensors              the weights; several shards with model.safetensors.index.json when bigger than
                                   `max_shard_size`
    tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer with its mask token and chat format
    preprocessor_config.json       Dimple only: the Qwen2-VL image processor
    generation_config.json         the decoding defaults under `diffusion` (what `diffusion_generate` reads), the
                                   mask and EOS ids
    adapter/                       only with `merge_lora: false` and a LoRA student: adapter_config.json and
                                   adapter_model.safetensors, for the teacher weights in the folder
    README.md, report-<task>.png   the model card: how to load and decode, the decoding defaults, the run's AUP report
                                   and plots, the recipe, the teacher
    recipe.yaml                    the run's resolved recipe
    export.json                    provenance: run, checkpoint (step, ZeRO stage, ranks), teacher, student, dtype,
                                   the decoder chosen and why (`distill verify` rebuilds the reference from it)
    MANIFEST.json                  size and sha256 of every file but itself and verify.json (`teachers/manifest.py`)
    verify.json                    what verification measured

Refusals are one line naming the file: `CheckpointError` (a checkpoint without its COMPLETE marker, a truncated or
missing state file, weights whose names or shapes are not the student's), `ExportError` (a folder that would not
load without fewstep; a checkpoint gone when an export is verified later), `VerifyError` (`distill/verify.py`).
Nothing is left half-written: the folder
is built in a hidden directory beside `out` and only renamed to `out` once written and verified; an existing
`out` is replaced only with `overwrite`, and removed only after the new folder is in place. An export that fails
or is interrupted (Ctrl-C or SIGTERM, each raising `Interrupted` while the folder is built) removes that hidden
directory on the way out.

A run is never replaced by its export: `OutputRefused` (`distill export` exits 2, before anything is written)
when `out` is a run directory (the run exported, or any folder with a `recipe.yaml` beside a `distill/`), holds
one, or lies inside one anywhere but `<run>/export`, where the run's own export stage writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from transformers import GenerationConfig

from distill.consolidate import load_student, resolve_checkpoint, teacher_dir_of
from distill.decoding import left_pad
from distill.files import write_atomically, write_json
from distill.recipe import DecoderConfig, ExportConfig, Recipe, RecipeError, dump_recipe, load_recipe
from distill.trainer import latest_complete_checkpoint
from distill.verify import (
    ADAPTER_DIR,
    EXPORT_FILE,
    VERIFY_FILE,
    Reference,
    RemoteCodeRefused,
    VerifyError,
    check_files,
    read_json,
    summary_line,
    untrusted_code,
    verify_export,
)
from eval.report import load_report, render_markdown
from eval.tasks import load_task_datasets
from students.build import merged_model
from students.defaults import generation_settings, recommended_decoder
from teachers.interface import Teacher
from teachers.manifest import write_manifest
from teachers.vision import collate_vision

# Eval prompts decoded by verification; fixed ones stand in when the run directory holds no task data.
VERIFY_SAMPLES = 4
FALLBACK_SAMPLES = [
    ("12+34=", "C:000 #### 046"),
    ("sort 3 1 2", "#### 1 2 3"),
    ("Ann has 5 apples and buys 3 more. How many apples does she have?", "5+3=8 #### 8"),
    ("7+8=", "C:10 #### 15"),
]


class ExportError(ValueError):
    """A run or folder that cannot be exported or verified; the message is one line naming the file."""


class OutputRefused(ExportError):
    """An `out` that is, holds or lies inside a run directory, so the export would replace or mix with the run."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT during an export, raised as KeyboardInterrupt so its staging folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------------
# Verification inputs: a few eval samples and what the training-side student computes on them


def verification_samples(recipe: Recipe, run_dir: Path, count: int = VERIFY_SAMPLES) -> list[tuple[str, str, tuple]]:
    """`(prompt, response, images)` of the first eval samples of the run's tasks, taken in turn (an image task's
    samples keep their images, so a Dimple export is verified on image prompts); fixed text ones without data."""
    try:
        datasets = load_task_datasets(Path(run_dir) / "data")
    except FileNotFoundError:
        datasets = {}
    tasks = [datasets[name]["eval"] for name in recipe.data.task_names() if name in datasets]
    samples = []
    for index in range(count if tasks else 0):
        split, position = tasks[index % len(tasks)], index // len(tasks)
        if position < len(split):
            record = split[position]
            samples.append((record["prompt"], record["response"], tuple(record.get("images") or ())))
    return samples or [(prompt, response, ()) for prompt, response in FALLBACK_SAMPLES[:count]]


def reference_outputs(
    student: Teacher, recipe: Recipe, run_dir: Path, checkpoint: Path, facts: dict[str, Any], gen_length: int
) -> Reference:
    """The fixed inputs of verification and the training-side student's raw logits on them.

    The inputs are the run's first eval samples (`verification_samples`), each a prompt followed by its reference
    response on the `gen_length` canvas with every third position masked, the kind of partly decoded state a
    decoder feeds the model. `student` is what `load_student` made of `checkpoint` (with its `facts`).
    """
    samples = verification_samples(recipe, run_dir)
    tokenizer = student.tokenizer
    encoded = [student.encode_prompt(prompt, images) for prompt, _, images in samples]
    prompts = [prompt.ids for prompt in encoded]
    rows = []
    for prompt, (_, response, _) in zip(prompts, samples, strict=True):
        canvas = student.encode_response(response)[:gen_length]
        canvas += [student.pad_token_id] * (gen_length - len(canvas))
        rows.append(prompt + [student.mask_token_id if j % 3 == 1 else token for j, token in enumerate(canvas)])
    input_ids, attention_mask = left_pad(rows, student.pad_token_id)
    prompt_ids, prompt_mask = left_pad(prompts, student.pad_token_id)
    vision = collate_vision([prompt.vision for prompt in encoded])
    with torch.no_grad():
        logits = student.model(input_ids=input_ids, attention_mask=attention_mask, **vision).logits.float()
    return Reference(
        questions=[prompt for prompt, _, _ in samples],
        images=[list(images) for _, _, images in samples],
        vision=[prompt.vision for prompt in encoded],
        prompts=prompts,
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        logits=logits,
        mask_token=tokenizer.mask_token,
        source=f"{checkpoint} (ZeRO-{facts['zero_stage']}, {facts['world_size']} rank(s))",
    )


# ----------------------------------------------------------------------------------------------------------------
# The folder


def _model_card(
    recipe: Recipe,
    provenance: dict[str, Any],
    settings: dict[str, Any],
    report: dict | None,
    example: str,
) -> str:
    name = recipe.run.name
    adapter = provenance["student"]["adapter"]
    load = [
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'model = AutoModel.from_pretrained("PATH", trust_remote_code=True).eval()',
        'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
    ]
    if adapter:
        load += ["from peft import PeftModel", "", 'model = PeftModel.from_pretrained(model, "PATH/adapter").eval()']
    load += [
        f"prompt = tokenizer.apply_chat_template([{{'role': 'user', 'content': {example!r}}}],",
        "                                       add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        'out = model.diffusion_generate(prompt["input_ids"], attention_mask=prompt["attention_mask"])',
        'print(tokenizer.decode(out.sequences[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    checkpoint, teacher = provenance["checkpoint"], provenance["teacher"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [fewstep, diffusion-language-model, masked-diffusion, distillation]",
        "---",
        "",
        f"# {name}: a few-step student distilled with fewstep",
        "",
        f"Distilled from the `{teacher['name']}` teacher `{teacher['dir']}` ({recipe.student.kind} student"
        + (
            f", LoRA r={recipe.student.lora.r}, α={recipe.student.lora.alpha:g}"
            if recipe.student.kind == "lora"
            else ""
        )
        + f"), step {checkpoint['step']} of the run `{name}` (ZeRO-{checkpoint['zero_stage']}, "
        f"{checkpoint['world_size']} rank(s)); weights in {provenance['dtype']}"
        + (", LoRA adapters merged." if recipe.student.kind == "lora" and not adapter else ".")
        + (" The LoRA adapters are kept in `adapter/` (peft) on top of the teacher's weights." if adapter else ""),
        "",
        "## Load and decode (no fewstep needed)",
        "",
        "```python",
        *load,
        "```",
        "",
        "## Decoding defaults (`generation_config.json`, key `diffusion`)",
        "",
        f"Chosen from {provenance['decoder_source']}. Any of them can be overridden per call, "
        "e.g. `model.diffusion_generate(ids, attention_mask=mask, threshold=0.95, cache='none')`; "
        "`diffusion_generate` runs fewstep's own decoding module (`diffusion_generation.py`, beside the weights).",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{key}` | `{json.dumps(value)}` |" for key, value in settings.items()],
        "",
    ]
    lines += ["## Evaluation (the run's AUP report)", ""]
    if report is None:
        lines += ["The run has no evaluation report (`eval/report.json`).", ""]
    else:
        lines += [
            "From the run's `eval` stage, which scored `<run>/student` (the student at the end of training)"
            + (f"; this export is step {checkpoint['step']}." if not checkpoint["latest"] else "."),
            "",
        ]
        # The report's own Markdown, one heading level down; its plots are copied beside this card.
        # Without its title line; the report's blank line after the title is already there.
        body = render_markdown(report).strip().splitlines()[2:]
        lines += ["#" + line if line.startswith("#") else line for line in body] + [""]
    lines += ["## Recipe", "", "The run's resolved recipe (also in `recipe.yaml`):", "", "```yaml"]
    lines += [dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def write_folder(
    folder: Path,
    student: Teacher,
    recipe: Recipe,
    run_dir: Path,
    settings: ExportConfig,
    provenance: dict[str, Any],
) -> None:
    """Write the export into the (empty) `folder`: weights, config + code, tokenizer, generation config, card."""
    teacher_dir = Path(provenance["teacher"]["dir"])
    model = student.model
    if provenance["student"]["adapter"]:
        # The adapter goes to its own folder; the teacher's weights, as loaded from the checkpoint, stay as the base.
        model.peft_config["default"].base_model_name_or_path = None  # the base is this folder, wherever it moves
        model.save_pretrained(folder / ADAPTER_DIR)
        (folder / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's empty template; the card is ours
        model = model.unload()
    else:
        model = merged_model(model)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[settings.dtype])
    model.save_pretrained(folder, max_shard_size=settings.max_shard_size)
    student.tokenizer.save_pretrained(folder)
    if student.image_processor is not None:
        student.image_processor.save_pretrained(folder)
    # save_pretrained wrote fewstep's configuration/modeling files for the backbone, and `diffusion_generation.py`
    # they import, with the `auto_map` naming them (the classes are registered for the Auto classes).
    if "auto_map" not in json.loads((folder / "config.json").read_text()):
        raise ExportError(f"{folder / 'config.json'}: no auto_map, the folder would not load without fewstep")

    decoder = DecoderConfig.model_validate(provenance["decoder"])
    diffusion = generation_settings(decoder, student)
    base = teacher_dir / "generation_config.json"
    generation = GenerationConfig.from_pretrained(teacher_dir) if base.is_file() else GenerationConfig()
    tokenizer = student.tokenizer
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        # The end-of-turn token first: it ends an answer for `diffusion_generate`, as for fewstep's decoders.
        "eos_token_id": list(dict.fromkeys([student.end_token_id, student.eos_token_id])),
        "pad_token_id": student.pad_token_id,
        "mask_token_id": student.mask_token_id,
    }
    # A generation config derived from a model config (`_from_model_config`, as save_pretrained writes one) drops
    # every name GenerationConfig does not declare when read back; this one is written on purpose.
    generation._from_model_config = False
    # setattr rather than `update`, which skips names GenerationConfig does not declare (mask id, diffusion).
    for name, value in (token_ids | {"diffusion": diffusion}).items():
        setattr(generation, name, value)
    generation.save_pretrained(folder)

    report = None
    report_dir = Path(run_dir) / "eval"
    if (report_dir / "report.json").is_file():
        report = load_report(report_dir)
        for plot in report_dir.glob("report-*.png"):
            shutil.copy2(plot, folder / plot.name)
    example = verification_samples(recipe, run_dir, 1)[0][0]
    write_atomically(folder / "README.md", _model_card(recipe, provenance, diffusion, report, example))
    write_atomically(folder / "recipe.yaml", dump_recipe(recipe))
    write_json(folder / EXPORT_FILE, provenance)
    # Last: the size and sha256 of every file above, which `distill verify` checks (verify.json is its result).
    write_manifest(folder, exclude={VERIFY_FILE})


# ----------------------------------------------------------------------------------------------------------------
# Where the folder may go, and how it gets there


EXPORT_DIR = "export"  # `<run>/export`: where the run's export stage writes, the one place inside a run allowed
REPLACED = "replaced"  # an old `out`, moved aside into the staging directory until the new folder is in place


def is_run_dir(path: Path) -> bool:
    """A fewstep run directory: the resolved recipe `distill run` writes, beside its distillation phase."""
    return (path / "recipe.yaml").is_file() and (path / "distill").is_dir()


def check_out(run_dir: Path, out: Path) -> None:
    """Raise `OutputRefused` when `out` is a run directory, holds one, or lies inside one (but `<run>/export`).

    The run exported counts whether or not it has `distill/`. Runs below an existing `out` are searched for, since
    `overwrite` would delete them with it.
    """
    run, target = Path(run_dir).resolve(), Path(out).resolve()
    advice = "choose a folder outside it"
    if target == run or is_run_dir(target):
        raise OutputRefused(f"--out {out}: is the run directory {target}, which the export would replace; {advice}")
    if run in target.parents:
        holder = run
    else:
        holder = next((parent for parent in target.parents if is_run_dir(parent)), None)
    if holder is not None and target != holder / EXPORT_DIR:
        raise OutputRefused(f"--out {out}: inside the run directory {holder}; {advice} or use {holder / EXPORT_DIR}")
    if target in run.parents:
        raise OutputRefused(f"--out {out}: holds the run directory {run}, which the export would replace; {advice}")
    if target.is_dir():
        for folder, _, _ in os.walk(target):
            if is_run_dir(Path(folder)):
                raise OutputRefused(f"--out {out}: holds the run directory {folder}, which --overwrite would delete")


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise `Interrupted` (once; more are ignored while cleanup runs).

    SIGINT is handled here too, rather than left to Python's KeyboardInterrupt: a process started with SIGINT
    ignored (a background job of a non-interactive shell) would otherwise finish an export it was told to stop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread; a thread's caller owns its cleanup
        return
    handled = (signal.SIGTERM, signal.SIGINT)

    def interrupt(signum: int, frame: object) -> None:
        for number in handled:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {number: signal.signal(number, interrupt) for number in handled}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _move_into_place(folder: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `folder` to `out`; an old `out` is moved aside first and deleted once replaced."""
    old = folder.parent / REPLACED
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
        out.rename(old)
    folder.rename(out)


# ----------------------------------------------------------------------------------------------------------------
# The job


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe `distill run` wrote into `run_dir` (RecipeError when it is not a run directory)."""
    path = Path(run_dir) / "recipe.yaml"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise RecipeError(f"{path}: missing; RUN_DIR must be a directory written by `distill run`")
    return load_recipe(path)


def export_settings(recipe: Recipe, **flags: Any) -> ExportConfig:
    """The recipe's `export` section with the given (non-None) values over it, validated as recipe fields."""
    values = recipe.export.model_dump() | {key: value for key, value in flags.items() if value is not None}
    try:
        return ExportConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        raise RecipeError(f"export.{first['loc'][0]}: {first['msg']}, got {first.get('input')!r}") from None


def export_run(
    run_dir: Path,
    out: Path,
    checkpoint: str | int | None = None,
    merge_lora: bool | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    *,
    max_shard_size: int | str | None = None,
    verify: bool | None = None,
    recipe: Recipe | None = None,
) -> Path:
    """Export checkpoint `checkpoint` of the run in `run_dir` to the folder `out`; returns `out`.

    Options left None take the run recipe's `export` section (`ExportConfig`). Raises `OutputRefused` for an `out`
    that would replace or mix with a run, `CheckpointError` for a checkpoint that cannot be read back,
    `FileExistsError` when `out` exists and not `overwrite`, `VerifyError` when the written folder fails
    verification (nothing is then left behind), `RecipeError` for bad options.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_out(run_dir, out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
    recipe = recipe or load_run_recipe(run_dir)
    settings = export_settings(
        recipe, checkpoint=checkpoint, merge_lora=merge_lora, dtype=dtype, max_shard_size=max_shard_size, verify=verify
    )
    step, checkpoint_dir = resolve_checkpoint(run_dir, settings.checkpoint)
    student, facts = load_student(recipe, run_dir, checkpoint_dir)
    report = load_report(run_dir / "eval") if (run_dir / "eval" / "report.json").is_file() else None
    decoder, decoder_source = recommended_decoder(recipe, report)
    latest = latest_complete_checkpoint(checkpoint_dir.parent)
    adapter = recipe.student.kind == "lora" and not settings.merge_lora
    provenance = {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fewstep": metadata.version("fewstep"),
        "run": recipe.run.name,
        "run_dir": str(run_dir.resolve()),
        "checkpoint": {
            "step": step,
            "dir": str(checkpoint_dir.resolve()),
            "latest": latest is not None and latest[0] == step,
            **facts,
        },
        "teacher": {"name": recipe.teacher.name, "dir": str(teacher_dir_of(recipe, run_dir).resolve())},
        "student": {"kind": recipe.student.kind, "merge_lora": settings.merge_lora, "adapter": adapter},
        "dtype": settings.dtype,
        "max_shard_size": settings.max_shard_size,
        "decoder": decoder.model_dump(mode="json"),
        "decoder_source": decoder_source,
    }
    reference = None
    if settings.verify:
        # Computed before the export merges or casts the student in place.
        reference = reference_outputs(student, recipe, run_dir, checkpoint_dir, facts, decoder.gen_length)

    out.parent.mkdir(parents=True, exist_ok=True)
    # The folder is built under its final name inside a hidden directory beside `out` (same file system, so the
    # final rename is atomic; same name, so remote code caches it under the name it will keep).
    with signals_raise():
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            folder = staging / out.name
            folder.mkdir()
            write_folder(folder, student, recipe, run_dir, settings, provenance)
            if reference is not None:
                verify_export(folder, reference)
            _move_into_place(folder, out, overwrite)
        finally:
            if (staging / REPLACED).exists() and not out.exists():
                (staging / REPLACED).rename(out)  # stopped between moving the old `out` aside and the new one in
            shutil.rmtree(staging, ignore_errors=True)
    return out


def verify_folder(folder: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """`distill verify DIR`: verify an export against the checkpoint it came from (named in its export.json).

    The folder's code runs in a child process: unless it is fewstep's own (`untrusted_code`), only with
    `trust_remote_code` (`RemoteCodeRefused` otherwise).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    reason = untrusted_code(folder)
    if reason is not None and not trust_remote_code:
        raise RemoteCodeRefused(f"{reason}; verifying runs the folder's code, pass --trust-remote-code to allow it")
    check_files(folder)  # before the (for a large model, slow) consolidation the reference needs
    provenance = read_json(folder / EXPORT_FILE)
    try:
        run_dir, checkpoint = Path(provenance["run_dir"]), Path(provenance["checkpoint"]["dir"])
    except (KeyError, TypeError):
        raise VerifyError(f"{folder / EXPORT_FILE}: names no run_dir and checkpoint.dir to verify against") from None
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: gone, the checkpoint this export came from is needed to verify it")
    recipe = load_run_recipe(run_dir)
    student, facts = load_student(recipe, run_dir, checkpoint)
    decoder = DecoderConfig.model_validate(provenance["decoder"])
    return verify_export(folder, reference_outputs(student, recipe, run_dir, checkpoint, facts, decoder.gen_length))


def export_command(run_dir: Path, out: Path, **flags: Any) -> Path:
    """`distill export`: `export_run` plus a one-line summary."""
    began = time.perf_counter()
    path = export_run(run_dir, out, **flags)
    verified = path / VERIFY_FILE
    note = "verified: " + summary_line(json.loads(verified.read_text())) if verified.is_file() else "not verified"
    print(f"[export] {path} ({note}) in {time.perf_counter() - began:.1f} s")
    return path
