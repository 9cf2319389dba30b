"""`distill verify`: an exported folder is whole, and loads and decodes without fewstep as the student it came from.

1. Files. `config.json` has an `auto_map` and the modules it names are in the folder; every weights file is
   present and whole: each shard the index lists (or `model.safetensors`), and the adapter's weights, must have
   a safetensors header that parses and be exactly as long as that header says (a cut-off copy is not); the
   tokenizer and `generation_config.json` are there. Then every file against `MANIFEST.json`, which the export
   wrote last (`teachers/manifest.py`): each one listed present with its size and sha256, and no other file but
   `verify.json` (a folder without a manifest was not exported by this fewstep; see below).
2. A fresh process. `python -I` (no PYTHONPATH, no user site, no working directory on the path) started in an empty
   directory, with an import hook that refuses fewstep's packages (`distill`, `teachers`, `students`, `eval`), so
   even an editable or regular install of fewstep cannot be imported; the child checks that it cannot. It loads
   the folder with `AutoModel` / `AutoTokenizer` and `trust_remote_code=True` (plus the peft adapter, if any),
   computes logits on the reference inputs, encodes the prompts with the chat template and decodes them with
   `diffusion_generate` at the exported defaults. Image prompts (a Dimple run's image task) are built there as a
   user builds them: the folder's `AutoImageProcessor` gives the patches, and each image's vision block
   (`<|vision_start|>`, one `<|image_pad|>` per merged patch, `<|vision_end|>`) precedes the question.
3. Comparisons in this process. Logits against the training-side student's (`Reference`): an fp32 export's
   largest absolute difference must be <= `FP32_ATOL`; a bf16 export's relative error ||diff|| / ||reference||
   (Frobenius norms over every logit) <= `BF16_RTOL`. bf16 keeps 8 bits of mantissa (about 0.4% per rounding)
   and the error grows over the layers, so single logits can be off by a few percent of the largest one (the
   quickstart student, 4 layers: relative error 0.45%, largest difference 0.57 on logits up to 25) while wrong
   weights are off by tens of percent. Prompt ids against fewstep's
   `encode_prompt`. Tokens, NFE and commit order against fewstep's decoder (`distill.decoding.decode`) with the
   same settings on the exported weights, loaded by fewstep with the same dtype and thread count, so both
   sides run the same arithmetic: equal, token for token.

The result is written to `verify.json` in the folder; a failed check raises `VerifyError` naming it.

Step 2 runs the folder's own Python files. `distill verify` runs them only for what fewstep exported
(`untrusted_code`: an `export.json` with fewstep's provenance, and every `.py` file byte for byte one of this
fewstep's backbone files, so the code is fewstep's own); any other folder needs the user's `--trust-remote-code`
(`RemoteCodeRefused` otherwise, before anything runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from distill.decoding import decode
from distill.files import write_json
from distill.recipe import DecoderConfig
from teachers import backbones as backbones_package
from teachers.interface import load_teacher, local_device
from teachers.manifest import ManifestError, check_manifest

EXPORT_FILE = "export.json"
VERIFY_FILE = "verify.json"
ADAPTER_DIR = "adapter"
FP32_ATOL = 1e-5
BF16_RTOL = 2e-2
FEWSTEP_PACKAGES = ("distill", "teachers", "students", "eval")
PROVENANCE_KEYS = ("format", "fewstep", "run_dir", "checkpoint", "teacher", "dtype", "decoder")  # export.json's
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class VerifyError(ValueError):
    """An export that fails verification; the message is one line naming the file or the check."""


class RemoteCodeRefused(VerifyError):
    """A folder whose code fewstep did not write, verified without the user's opt-in (`--trust-remote-code`)."""


@dataclass
class Reference:
    """Fixed inputs and what the training-side student computes on them (`distill.export.reference_outputs`)."""

    questions: list[str]  # the prompts as text, before the chat template
    images: list[list[Any]]  # each prompt's images (PIL), [] for a text prompt
    vision: list[Any]  # each prompt's `VisionInputs` as fewstep preprocessed them (None for a text prompt)
    prompts: list[list[int]]  # fewstep's prompt ids (`Teacher.encode_prompt`)
    input_ids: torch.Tensor  # [N, T] left-padded prompt + partly masked reference response
    attention_mask: torch.Tensor  # [N, T]
    prompt_ids: torch.Tensor  # [N, P] the prompts alone, left-padded as the decoder pads them
    prompt_mask: torch.Tensor  # [N, P]
    logits: torch.Tensor  # [N, T, V] raw (unaligned) logits of the training-side student, fp32
    mask_token: str
    source: str  # the checkpoint the reference was computed from


# ----------------------------------------------------------------------------------------------------------------
# 1. Files


def check_safetensors(path: Path) -> set[str]:
    """Tensor names of a whole safetensors file; VerifyError if it is missing, cut off or not safetensors."""
    if not path.is_file():
        raise VerifyError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 0 or 8 + length > size:
            raise VerifyError(f"{path}: truncated ({size} bytes, shorter than its safetensors header)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise VerifyError(f"{path}: not a safetensors file (its header is not JSON)") from None
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = 8 + length + max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    if size != end:
        raise VerifyError(f"{path}: truncated ({size} bytes, its header describes {end})")
    return set(entries)


def read_json(path: Path) -> Any:
    """A JSON file of the export; VerifyError naming it when it is missing or unreadable."""
    if not path.is_file():
        raise VerifyError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise VerifyError(f"{path}: not valid JSON ({error})") from None


def check_files(folder: Path) -> dict[str, Any]:
    """Step 1; returns what it found (`weights`: the weights files, `adapter`: whether there is one)."""
    config_file = folder / "config.json"
    auto_map = read_json(config_file).get("auto_map")
    if not auto_map:
        raise VerifyError(f"{config_file}: no auto_map, so the folder cannot load without fewstep")
    for reference in auto_map.values():
        # `module.Class`, or a list of them (tokenizers: slow and fast, either may be null).
        for name in filter(None, [reference] if isinstance(reference, str) else reference):
            module = folder / f"{name.split('--')[-1].rsplit('.', 1)[0]}.py"
            if not module.is_file():
                raise VerifyError(f"{module}: missing, config.json's auto_map names it")
    for name in ("tokenizer_config.json", "generation_config.json", EXPORT_FILE):
        read_json(folder / name)

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map", {})
        found: dict[str, set[str]] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise VerifyError(f"{folder / shard}: missing shard listed in {index_file.name}")
            found[shard] = check_safetensors(folder / shard)
        for name, shard in weight_map.items():
            if name not in found[shard]:
                raise VerifyError(f"{folder / shard}: lacks {name}, which {index_file.name} places there")
        weights = sorted(found)
    else:
        check_safetensors(folder / "model.safetensors")
        weights = ["model.safetensors"]

    adapter = (folder / ADAPTER_DIR).is_dir()
    if adapter:
        if not (folder / ADAPTER_DIR / "adapter_config.json").is_file():
            raise VerifyError(f"{folder / ADAPTER_DIR / 'adapter_config.json'}: missing")
        check_safetensors(folder / ADAPTER_DIR / "adapter_model.safetensors")
    try:
        # Every byte as exported; the structure checks above name a cut-off or missing weights file more plainly.
        check_manifest(folder, strict=True, ignore={VERIFY_FILE})
    except ManifestError as error:
        raise VerifyError(str(error)) from None
    return {"weights": weights, "adapter": adapter}


def untrusted_code(folder: Path) -> str | None:
    """Why running `folder`'s code needs the user's opt-in (one line naming the file), or None for an export of
    this fewstep: export.json holds fewstep's provenance, every `auto_map` entry names a module in the folder, and
    each `.py` file in it equals the file of that name in fewstep's `teachers/backbones/`."""
    provenance_file = folder / EXPORT_FILE
    if not provenance_file.is_file():
        return f"{provenance_file}: missing, so fewstep did not export {folder}"
    try:
        provenance = json.loads(provenance_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{provenance_file}: not valid JSON, so not fewstep's provenance"
    missing = [key for key in PROVENANCE_KEYS if not isinstance(provenance, dict) or key not in provenance]
    if missing:
        return f"{provenance_file}: not fewstep's provenance (no {', '.join(missing)})"
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue  # step 1 names the file
        if "--" in json.dumps(auto_map):  # `repo--module.Class`: code fetched from another repository
            return f"{folder / name}: its auto_map names code from another repository"
    backbones = Path(backbones_package.__file__).parent
    for path in sorted(folder.rglob("*.py")):
        own = backbones / path.name
        if not own.is_file():
            return f"{path}: not one of fewstep's files (teachers/backbones/ has no {path.name})"
        if own.read_bytes() != path.read_bytes():
            return f"{path}: differs from fewstep's teachers/backbones/{path.name} (edited, or another fewstep version)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# 2. The fresh process

CHILD_SCRIPT = r"""
import importlib.abc, json, sys

HIDDEN = set(sys.argv[2].split(","))


# `-I` keeps PYTHONPATH and the working directory off sys.path, but an editable or regular install of fewstep
# still sits in site-packages: its packages are refused here, so nothing the folder loads can lean on them.


class HideFewstep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ImportError(f"{name} is hidden: the export must load without fewstep")
        return None


sys.meta_path.insert(0, HideFewstep())
for name in sorted(HIDDEN):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"fewstep's package {name} is importable in the verification process")

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

job = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(job["threads"])
device = torch.device(job["device"])  # where fewstep's side decodes too: the two compare token for token
inputs = {name: value.to(device) for name, value in torch.load(job["inputs"]).items()}
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
model = AutoModel.from_pretrained(job["folder"], trust_remote_code=True, dtype=dtype).eval().to(device)
tokenizer = AutoTokenizer.from_pretrained(job["folder"], trust_remote_code=True)
if job["adapter"]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, job["adapter"]).eval()
outputs = {}
vision, blocks = {}, [""] * len(job["questions"])
if any(job["images"]):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(job["folder"])
    pixel_values, grids = [], []
    for row, paths in enumerate(job["images"]):
        if not paths:
            continue
        processed = processor(images=[Image.open(path).convert("RGB") for path in paths], return_tensors="pt")
        pixel_values.append(processed["pixel_values"])
        grids.append(processed["image_grid_thw"])
        merge = processor.merge_size ** 2
        blocks[row] = "".join(
            "<|vision_start|>" + "<|image_pad|>" * int(n // merge) + "<|vision_end|>"
            for n in processed["image_grid_thw"].prod(-1)
        )
    vision = {"pixel_values": torch.cat(pixel_values).to(device), "image_grid_thw": torch.cat(grids).to(device)}
with torch.no_grad():
    outputs["logits"] = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **vision
    ).logits.float().cpu()
prompts = []
for block, question in zip(blocks, job["questions"]):
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": block + question}], add_generation_prompt=True, tokenize=True
    )
    prompts.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
outputs["prompts"] = prompts
generated = model.diffusion_generate(inputs["prompt_ids"], attention_mask=inputs["prompt_mask"], **vision)
outputs.update(sequences=generated.sequences.cpu(), nfe=generated.nfe.cpu(), order=generated.order.cpu())
torch.save(outputs, job["outputs"])
print(json.dumps({
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "model_class": type(model).__name__,
    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    "mask_token": tokenizer.mask_token,
    "chat_template": bool(tokenizer.chat_template),
    "fewstep_modules_loaded": sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN),
}))
"""


def run_child(folder: Path, reference: Reference, dtype: str, adapter: bool, timeout: int) -> tuple:
    """Step 2: `(facts the child printed, its tensors)`; VerifyError with the child's last line if it fails."""
    with tempfile.TemporaryDirectory(prefix="fewstep-verify-") as scratch:
        scratch = Path(scratch)
        inputs = {
            "input_ids": reference.input_ids,
            "attention_mask": reference.attention_mask,
            "prompt_ids": reference.prompt_ids,
            "prompt_mask": reference.prompt_mask,
        }
        torch.save(inputs, scratch / "inputs.pt")
        images = []
        for row, row_images in enumerate(reference.images):
            images.append([])
            for index, image in enumerate(row_images):
                images[-1].append(str(scratch / f"image-{row}-{index}.png"))
                image.save(images[-1][-1])  # PNG: lossless, the child reads the same pixels
        job = {
            "images": images,
            "folder": str(folder.resolve()),
            "adapter": str((folder / ADAPTER_DIR).resolve()) if adapter else None,
            "dtype": dtype,
            "device": str(local_device()),
            "threads": torch.get_num_threads(),
            "questions": reference.questions,
            "inputs": str(scratch / "inputs.pt"),
            "outputs": str(scratch / "outputs.pt"),
        }
        (scratch / "job.json").write_text(json.dumps(job))
        (scratch / "work").mkdir()
        # A launcher's rendezvous variables would make libraries in the child look for a process group.
        env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
        # A private remote-code cache: the child imports this folder's modeling files, never a copy cached from an
        # earlier folder of the same name. Everything is local, so the Hub is never asked.
        env["HF_MODULES_CACHE"] = str(scratch / "modules")
        env.setdefault("HF_HUB_OFFLINE", "1")
        command = [sys.executable, "-I", "-c", CHILD_SCRIPT, str(scratch / "job.json"), ",".join(FEWSTEP_PACKAGES)]
        try:
            done = subprocess.run(
                command, cwd=scratch / "work", env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise VerifyError(f"{folder}: the verification process did not finish in {timeout} s") from None
        if done.returncode != 0:
            lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
            raise VerifyError(f"{folder}: loading it without fewstep failed: {lines[-1] if lines else done.returncode}")
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        return facts, torch.load(scratch / "outputs.pt")


# ----------------------------------------------------------------------------------------------------------------
# 3. Comparisons


def logit_error(dtype: str, logits: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """How far `logits` are from `reference`, and the measure and tolerance that apply to `dtype`."""
    difference = logits - reference
    measured = {
        "max_abs_diff": float(difference.abs().max()),
        "relative_error": float(difference.norm() / reference.norm().clamp(min=1e-30)),
    }
    measure, tolerance = ("max_abs_diff", FP32_ATOL) if dtype == "fp32" else ("relative_error", BF16_RTOL)
    return measured | {"measure": measure, "tolerance": tolerance, "ok": measured[measure] <= tolerance}


def fewstep_decode(folder: Path, provenance: dict, reference: Reference, adapter: bool) -> Any:
    """fewstep's decoder on the exported weights, loaded by fewstep, with the exported decoding defaults."""
    teacher = load_teacher(provenance["teacher"]["name"], folder, provenance["dtype"])
    if adapter:
        from peft import PeftModel

        teacher = teacher.with_model(PeftModel.from_pretrained(teacher.model, folder / ADAPTER_DIR).eval())
    decoder = DecoderConfig.model_validate(provenance["decoder"])
    return decode(teacher, reference.prompts, decoder, decoder.gen_length, vision=reference.vision), decoder


def verify_export(folder: Path, reference: Reference, *, timeout: int = 900) -> dict[str, Any]:
    """Run the three steps on `folder`; write and return verify.json's content, or raise VerifyError."""
    folder = Path(folder)
    began = time.perf_counter()
    files = check_files(folder)
    provenance = read_json(folder / EXPORT_FILE)
    dtype = provenance["dtype"]
    if "diffusion" not in read_json(folder / "generation_config.json"):
        raise VerifyError(f"{folder / 'generation_config.json'}: no `diffusion` decoding settings")
    facts, outputs = run_child(folder, reference, dtype, files["adapter"], timeout)

    error = logit_error(dtype, outputs["logits"], reference.logits)
    result: dict[str, Any] = {
        "ok": False,
        "checked": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "child": facts,
        "logits": {
            "inputs": list(reference.input_ids.shape),
            "reference": reference.source,
            "dtype": dtype,
            **error,
        },
        "tokenizer": {"prompts_equal": outputs["prompts"] == reference.prompts},
    }
    failures = []
    if facts["fewstep_modules_loaded"]:
        failures.append(f"fewstep modules were loaded: {', '.join(facts['fewstep_modules_loaded'])}")
    if facts["dtype"] != {"fp32": "float32", "bf16": "bfloat16"}[dtype]:
        failures.append(f"weights loaded as {facts['dtype']}, exported as {dtype}")
    if not error["ok"]:
        failures.append(
            f"logits differ from {reference.source}: {error['measure']} {error[error['measure']]:.3g} > "
            f"{error['tolerance']:.3g}"
        )
    if facts["mask_token"] != reference.mask_token or not facts["chat_template"]:
        failures.append(f"tokenizer: mask token {facts['mask_token']!r}, chat template {facts['chat_template']}")
    if not result["tokenizer"]["prompts_equal"]:
        failures.append("the chat template encodes the prompts differently from fewstep")
    expected, decoder = fewstep_decode(folder, provenance, reference, files["adapter"])
    response = outputs["sequences"][:, reference.prompt_ids.shape[1] :]
    result["decode"] = {
        "prompts": len(reference.prompts),
        "image_prompts": sum(bool(images) for images in reference.images),
        "decoder": decoder.model_dump(mode="json"),
        "tokens_equal": torch.equal(response, expected.tokens),
        "nfe_equal": torch.equal(outputs["nfe"], expected.nfe),
        "order_equal": torch.equal(outputs["order"], expected.order),
        "nfe": expected.nfe.tolist(),
    }
    unequal = [key.removesuffix("_equal") for key, value in result["decode"].items() if value is False]
    if unequal:
        failures.append(f"diffusion_generate differs from fewstep's decoder in {', '.join(unequal)}")
    result.update(ok=not failures, failures=failures, seconds=round(time.perf_counter() - began, 2))
    write_json(folder / VERIFY_FILE, result)
    if failures:
        raise VerifyError(f"{folder}: {failures[0]}")
    return result


def summary_line(result: dict[str, Any]) -> str:
    """verify.json's content in a few words, for the command line."""
    logits = result["logits"]
    line = f"logits {logits['measure']} {logits[logits['measure']]:.2e} <= {logits['tolerance']:.0e}"
    if "prompts" in result["decode"]:
        line += f", diffusion_generate == fewstep's decoder on {result['decode']['prompts']} prompts"
        if result["decode"].get("image_prompts"):
            line += f" ({result['decode']['image_prompts']} with images)"
    return line
