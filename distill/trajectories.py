"""Pseudo-trajectories (d3LLM): the teacher decodes every training prompt one token per forward, block by block,
and the step at which each response position was unmasked (its *order*) is recorded with the teacher's tokens,
whether its answer is right, NFE and the reference response.

Decoding goes through the one engine, `distill.decoding.decode`, with steps = gen_length. `choice: confidence` is
the `low_confidence` decoder (each forward commits the most probable masked position of the current block).
`choice: entropy` is the `threshold` decoder with `neg_entropy` confidence and threshold 0: a negative entropy is
never above 0, so nothing is committed by threshold and each forward commits exactly the lowest-entropy masked
position of the current block. Prompts become ids only through `distill.data.encode_records`, i.e. with
`Teacher.encode_prompt`, the chat format training uses, so an order is never recorded on a differently formatted
prompt (the reference implementation's bug).

Rows (`FEATURES`), one per sample:
    sample_id        the task record's id, unique in a set
    task             task name
    prompt_ids       `Teacher.encode_prompt(prompt, images).ids`
    image_sha256     content hashes (`teachers.vision.image_sha256`) of the prompt's images, in order; the images
                     stay in the run's task data, where distillation finds them by hash (the manifest's
                     `data_hash` covers them)
    response_ids     reference answer + EOS (`Teacher.encode_response`)
    teacher_ids      the teacher's final canvas, gen_length ids (EOS after its answer)
    target_ids       what training learns with `order` (`trajectories.tokens`): the reference pad-filled to the
                     canvas as training pads answers ("pseudo", d3LLM) or `teacher_ids`
    order            gen_length steps, 0-based: when each position was unmasked; -1 where no forward committed it
                     (the tail after the teacher's EOS, which the engine fills with EOS)
    teacher_correct  the teacher's answer is right (`eval.tasks.is_correct`) at the kept attempt
    nfe              forward passes of the kept attempt
    temperature      temperature of the kept attempt (`trajectories.temperatures`: wrong answers are retried)

Storage, under `run.output_dir`:
    trajectories/                        the set: `datasets.load_from_disk` reads it; `load_trajectories` checks it
        data-*.arrow, state.json, dataset_info.json
        manifest.json                    identity fields, counts, sha256 of every data file
    trajectories-shards/
        shard-00003-of-00016/            a finished shard: Arrow dataset + COMPLETE (JSON: key, counts, sha256s)
        shard-00004-of-00016.tmp/        a shard being written; replaced when its shard is decoded again

Manifest identity: `format`, `tokenizer_hash` (sha256 of `TOKENIZER_FILES` present, the chat template included),
`teacher_fingerprint` (`teachers.fingerprint.checkpoint_fingerprint`: config, tokenizer, safetensors headers, sizes
and mtimes, read without the weights; their content sha256 instead of mtimes with `run.strict_hash`), `data_hash`
(sha256 of the ids, prompts and responses in order), `decoder` (the engine settings, `choice` and `temperatures`),
`keep`, `tokens`; plus `generation` (batch size, shard count, seed: they decide which samples share a sampling
generator) and `fewstep_version`. Their hash is the set's `key`.

Scale and resume: the records are split into `trajectories.shards` contiguous shards; rank r of a launcher's
world decodes the shards i with i % world_size == r. A shard is written to `<name>.tmp` and renamed when complete;
a shard whose COMPLETE key matches and whose files verify is skipped, so a killed run restarted with the same
command finishes with every sample exactly once. After a barrier rank 0 concatenates the shards in order into
`trajectories/` (written to `trajectories.tmp`, then renamed). A set whose key already matches is left as is.

The module runs past ~400 lines because writing a set and checking one share the manifest and verification rules;
kept in one file, they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
from datasets import (
    Dataset,
    Features,
    Sequence,
    Value,
    are_progress_bars_disabled,
    concatenate_datasets,
    disable_progress_bars,
    enable_progress_bars,
    load_from_disk,
)

from distill import __version__
from distill.data import EncodedExample, encode_records
from distill.decoding import DecodeResult, decode
from distill.ranks import join_ranks, prepare_datasets
from distill.recipe import DecoderConfig, Recipe, TrajectoriesConfig
from eval.tasks import is_correct
from teachers.fingerprint import TOKENIZER_FILES, checkpoint_fingerprint
from teachers.interface import Teacher, load_teacher
from teachers.manifest import sha256_of
from teachers.vision import image_sha256

# 2: the teacher is named by `teacher_fingerprint` (was `teacher_hash`); a format-1 set is refused, never misread.
FORMAT_VERSION = 2
SET_DIR, SHARDS_DIR = "trajectories", "trajectories-shards"
MANIFEST_FILE, COMPLETE_MARKER = "manifest.json", "COMPLETE"

_IDS = Sequence(Value("int32"))
FEATURES = Features(
    {
        "sample_id": Value("string"),
        "task": Value("string"),
        "prompt_ids": _IDS,
        "image_sha256": Sequence(Value("string")),
        "response_ids": _IDS,
        "teacher_ids": _IDS,
        "target_ids": _IDS,
        "order": _IDS,
        "teacher_correct": Value("bool"),
        "nfe": Value("int32"),
        "temperature": Value("float64"),
    }
)
_MISSING = "<missing>"


# ----------------------------------------------------------------------------------------------------------------
# Decoder settings and identity hashes


def trajectory_decoder(config: TrajectoriesConfig, gen_length: int, temperature: float) -> DecoderConfig:
    """Engine settings for one token per forward in blocks of `config.block_length` (see the module docstring)."""
    # No cache: a trajectory must record the exact teacher, not its cached approximation.
    common = dict(
        gen_length=gen_length, block_length=config.block_length, temperature=temperature, cache="none", eos_fill=False
    )
    if config.choice == "confidence":
        return DecoderConfig(name="low_confidence", steps=gen_length, **common)
    return DecoderConfig(name="threshold", confidence="neg_entropy", threshold=0.0, **common)


def tokenizer_hash(teacher_dir: Path) -> str:
    """sha256 of the tokenizer files present among `TOKENIZER_FILES` (vocabulary, settings, chat template)."""
    files = [Path(teacher_dir) / name for name in TOKENIZER_FILES if (Path(teacher_dir) / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{teacher_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return sha256_of(files, named=True)


def data_hash(records: list[dict]) -> str:
    """sha256 of the records' ids, prompts and responses, and the content hashes of their images, in order."""
    digest = hashlib.sha256()
    for record in records:
        identity = [record["id"], record["prompt"], record["response"]]
        if record.get("images"):
            identity.append([image_sha256(image) for image in record["images"]])
        digest.update(json.dumps(identity).encode() + b"\n")
    return digest.hexdigest()


def expected_manifest(recipe: Recipe, teacher_dir: Path, records: list[dict]) -> dict[str, Any]:
    """The identity fields a trajectory set must carry to serve `recipe` with this teacher and these records.

    Training passes them to `load_trajectories(path, **expected_manifest(...))`.
    """
    config = recipe.trajectories
    decoder = trajectory_decoder(config, recipe.data.max_response_tokens, 0.0)
    # tokenizer_hash before the fingerprint (which covers the tokenizer files too): `load_trajectories` names the
    # first field that differs, and "made with a different tokenizer" is the more useful message.
    return {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tokenizer_hash(teacher_dir),
        "teacher_fingerprint": checkpoint_fingerprint(teacher_dir, strict=recipe.run.strict_hash),
        "data_hash": data_hash(records),
        "decoder": {
            **decoder.model_dump(mode="json", exclude={"temperature"}),
            "choice": config.choice,
            "temperatures": list(config.temperatures),
        },
        "keep": config.keep,
        "tokens": config.tokens,
    }


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Decoding a shard


def training_records(recipe: Recipe, datasets: dict) -> list[dict]:
    """Each task's training split in `data` order, the first `trajectories.max_samples` of each."""
    records: list[dict] = []
    for name in recipe.data.task_names():
        split = datasets[name]["train"]
        if recipe.trajectories.max_samples is not None:
            split = split.select(range(min(recipe.trajectories.max_samples, len(split))))
        records.extend(split)
    return records


def attach_images(rows: list[dict], records: list[dict]) -> list[dict]:
    """Trajectory `rows` with their prompts' images (`images`) looked up by `image_sha256` among `records`' images
    (the run's task data); a hash that none of them has is a one-line ValueError naming the sample."""
    wanted = {digest for row in rows for digest in row.get("image_sha256") or ()}
    if not wanted:
        return rows
    found = {}
    for record in records:
        for image in record.get("images") or ():
            found.setdefault(image_sha256(image), image)
    for row in rows:
        digests = row.get("image_sha256") or ()
        missing = next((digest for digest in digests if digest not in found), None)
        if missing is not None:
            raise ValueError(
                f"trajectories: image {missing[:12]} of sample {row['sample_id']} is not in the run's task data"
            )
        row["images"] = [found[digest] for digest in digests]
    return rows


def batch_seed(seed: int, temperature: float, sample_ids: list[str]) -> int:
    """Seed of the sampling generator for the samples decoded together: reruns draw the same noise."""
    payload = json.dumps([seed, temperature, sample_ids]).encode()
    return int(hashlib.sha256(payload).hexdigest()[:16], 16) & (2**63 - 1)


def _row(
    teacher: Teacher,
    record: dict,
    example: EncodedExample,
    result: DecodeResult,
    index: int,
    tokens: str,
    temperature: float,
) -> dict:
    teacher_ids = result.tokens[index].tolist()
    gen_length = len(teacher_ids)
    # The canvas training builds (`distill.data.SequencePool`): the answer, EOS, then pad tokens.
    reference = example.response + [teacher.pad_token_id] * (gen_length - len(example.response))
    return {
        "sample_id": record["id"],
        "task": record["task"],
        "prompt_ids": example.prompt,
        "image_sha256": [image_sha256(image) for image in example.images],
        "response_ids": example.response,
        "teacher_ids": teacher_ids,
        "target_ids": reference if tokens == "reference" else teacher_ids,
        "order": result.order[index].tolist(),
        "teacher_correct": is_correct(teacher.decode_response(teacher_ids), record["answer"], record["task"]),
        "nfe": int(result.nfe[index]),
        "temperature": float(temperature),
    }


def decode_records(
    teacher: Teacher,
    records: list[dict],
    examples: list[EncodedExample],
    config: TrajectoriesConfig,
    gen_length: int,
    seed: int,
    advance: Callable[[int], None] = lambda count: None,
) -> tuple[list[dict], dict[str, int]]:
    """Trajectory rows of `records` (every one, in order) and counts: `decoded`, `first_correct`, `correct`,
    `retried`. A sample answered wrongly is decoded again at each next temperature; its last attempt is kept."""
    rows: list[dict] = [{}] * len(records)
    pending = list(range(len(records)))
    counts = {"decoded": len(records), "first_correct": 0, "correct": 0, "retried": 0}
    for attempt, temperature in enumerate(config.temperatures):
        if attempt > 0:
            counts["retried"] += len(pending)
        decoder = trajectory_decoder(config, gen_length, temperature)
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start : start + config.batch_size]
            generator = None
            if temperature > 0:
                seed_value = batch_seed(seed, temperature, [records[i]["id"] for i in batch])
                generator = torch.Generator().manual_seed(seed_value)
            vision = [teacher.vision_inputs(examples[i].images) if examples[i].images else None for i in batch]
            result = decode(teacher, [examples[i].prompt for i in batch], decoder, gen_length, generator, vision)
            for index, i in enumerate(batch):
                rows[i] = _row(teacher, records[i], examples[i], result, index, config.tokens, temperature)
            if attempt == 0:
                advance(len(batch))
        if attempt == 0:
            counts["first_correct"] = sum(row["teacher_correct"] for row in rows)
        pending = [i for i in pending if not rows[i]["teacher_correct"]]
        if not pending:
            break
    counts["correct"] = len(records) - len(pending)
    return rows, counts


# ----------------------------------------------------------------------------------------------------------------
# Storage: write to a temporary name, rename when complete, verify on every read


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    # The shard-writing progress bars of `datasets` would interleave with ours.
    were_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            enable_progress_bars()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _save_dataset(dataset: Dataset, directory: Path, marker_name: str, marker: dict) -> dict:
    """Write `dataset` and a JSON marker (with each data file's sha256) to `<directory>.tmp`, then rename it into
    place: a directory under its final name is always complete. Returns the marker."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _quiet_datasets():
        # `datasets` writes no data file for an empty dataset at its default sharding and cannot load it back.
        dataset.save_to_disk(str(tmp), num_shards=1 if len(dataset) == 0 else None)
    files = sorted(tmp.glob("*.arrow"))
    marker = {**marker, "files": {path.name: sha256_of([path], named=True) for path in files}}
    (tmp / marker_name).write_text(json.dumps(marker, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return marker


def _load_verified(directory: Path, marker: dict, what: str) -> Dataset:
    """Load a dataset directory written by `_save_dataset`, refusing missing, truncated or corrupt files."""
    recorded = marker.get("files", {})
    present = sorted(path.name for path in directory.glob("*.arrow"))
    if present != sorted(recorded):
        raise ValueError(f"{what}: data files {present} in {directory} differ from those recorded {sorted(recorded)}")
    for name, digest in recorded.items():
        if sha256_of([directory / name], named=True) != digest:
            raise ValueError(f"{what}: {directory / name} is truncated or corrupt (its sha256 differs from the record)")
    try:
        dataset = load_from_disk(str(directory))
    except (OSError, ValueError, pa.ArrowException) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{what}: cannot read {directory}: {detail}") from None
    if len(dataset) != marker.get("samples"):
        raise ValueError(f"{what}: {directory} holds {len(dataset)} samples, its record says {marker.get('samples')}")
    return dataset


def _difference(have: Any, want: Any, path: str) -> str | None:
    """The first field where a manifest value differs from the expected one, as `path: the set has X, ...`."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want)):
            found = _difference(have.get(key, _MISSING), want.get(key, _MISSING), f"{path}.{key}")
            if found:
                return found
        return None
    if have != want:
        return f"{path}: the set has {have!r}, expected {want!r}"
    return None


def load_trajectories(directory: str | Path, **expected: Any) -> Dataset:
    """Load a trajectory set after checking it: never a set that does not match or does not verify.

    `expected` are manifest fields the set must carry (usually `**expected_manifest(recipe, teacher_dir,
    records)`); the first mismatch raises a one-line ValueError naming the field (`tokenizer_hash` says the set
    was made with another tokenizer). Truncated or corrupt data files (sha256 against the manifest), a sample
    count that disagrees with the manifest, or Arrow errors also raise ValueError; no manifest raises
    FileNotFoundError.
    """
    directory = Path(directory)
    manifest = _read_json(directory / MANIFEST_FILE)
    if not manifest:
        raise FileNotFoundError(f"{directory}: not a trajectory set (no readable {MANIFEST_FILE})")
    expected = {"format": FORMAT_VERSION, **json.loads(json.dumps(expected))}
    for field, value in expected.items():
        difference = _difference(manifest.get(field, _MISSING), value, field)
        if difference:
            other = " (made with a different tokenizer)" if field == "tokenizer_hash" else ""
            raise ValueError(f"{directory}: trajectory manifest does not match{other}: {difference}")
    return _load_verified(directory, manifest, f"trajectories {directory}")


# ----------------------------------------------------------------------------------------------------------------
# Generation: shards per rank, resume, merge


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def _shard_bounds(total: int, count: int) -> list[tuple[int, int]]:
    # Contiguous shards keep the merged set in record order.
    return [(index * total // count, (index + 1) * total // count) for index in range(count)]


def _sum_over_ranks(values: list[float], world_size: int) -> list[float]:
    """Element-wise sum over ranks; also a barrier."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda count: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]trajectories"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} samples/s"),
        TimeRemainingColumn(),
    )
    began = time.perf_counter()
    with Progress(*columns) as progress:
        task = progress.add_task("trajectories", total=total, rate="-")

        def advance(count: int) -> None:
            progress.advance(task, count)
            done = progress.tasks[0].completed
            progress.update(task, rate=f"{done / max(time.perf_counter() - began, 1e-9):,.1f}")

        yield advance


def _is_current(directory: Path, marker_name: str, key: str) -> bool:
    """Whether a shard or set was written for `key` and its files still verify (said aloud when they do not)."""
    marker = _read_json(directory / marker_name)
    if marker.get("key") != key:
        return False
    try:
        _load_verified(directory, marker, directory.name)
    except ValueError as error:
        print(f"[trajectories] writing {directory.name} again: {error}")
        return False
    return True


def _merge(shard_dirs: list[Path], set_dir: Path, manifest: dict) -> dict:
    markers = [_read_json(directory / COMPLETE_MARKER) for directory in shard_dirs]
    parts = [_load_verified(d, m, f"shard {d.name}") for d, m in zip(shard_dirs, markers, strict=True)]
    merged = concatenate_datasets(parts)
    sample_ids = merged["sample_id"]
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError(f"trajectories: the shards in {shard_dirs[0].parent} repeat a sample_id")
    counts = {name: sum(marker[name] for marker in markers) for name in ("decoded", "first_correct", "correct")}
    counts["retried"] = sum(marker["retried"] for marker in markers)
    return _save_dataset(merged, set_dir, MANIFEST_FILE, {**manifest, "samples": len(merged), **counts})


def generate_trajectories(recipe: Recipe, teacher_dir: Path, records: list[dict], out_dir: Path) -> dict[str, Any]:
    """Decode `records` with the teacher at `teacher_dir` into `<out_dir>/trajectories/`; resumes and shards by
    rank (every rank of a launcher calls it). Returns the set's manifest plus `samples_per_s` and `seconds` of
    this call; prints a one-line summary on rank 0."""
    began = time.perf_counter()
    config, gen_length = recipe.trajectories, recipe.data.max_response_tokens
    config.check_canvas(gen_length)
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(f"trajectories: no teacher checkpoint at {teacher_dir} (run the teacher stage first)")
    rank, world_size = join_ranks()
    identity = expected_manifest(recipe, teacher_dir, records)
    generation = {"batch_size": config.batch_size, "shards": config.shards, "seed": recipe.run.seed}
    manifest = {**identity, "generation": generation, "fewstep_version": __version__}
    manifest["key"] = key = _key(manifest)
    set_dir, shard_root = out_dir / SET_DIR, out_dir / SHARDS_DIR
    names = [shard_name(index, config.shards) for index in range(config.shards)]

    # ---- decode this rank's unfinished shards ---------------------------------------------------------------
    decoded_now, decode_began = 0, time.perf_counter()
    current = _is_current(set_dir, MANIFEST_FILE, key)
    if not current:
        teacher = load_teacher(recipe.teacher.name, teacher_dir, recipe.teacher.dtype)
        examples = encode_records(teacher, records, gen_length)
        bounds = _shard_bounds(len(records), config.shards)
        shard_root.mkdir(parents=True, exist_ok=True)
        mine = range(rank, config.shards, world_size)
        todo = [i for i in mine if not _is_current(shard_root / names[i], COMPLETE_MARKER, key)]
        total = sum(bounds[i][1] - bounds[i][0] for i in todo)
        show = rank == 0 and recipe.logging.progress and sys.stdout.isatty()
        decode_began = time.perf_counter()  # samples/s counts decoding and writing, not loading and hashing
        with _progress(total, show) as advance:
            for i in todo:
                start, end = bounds[i]
                rows, counts = decode_records(
                    teacher, records[start:end], examples[start:end], config, gen_length, recipe.run.seed, advance
                )
                if config.keep == "correct":
                    rows = [row for row in rows if row["teacher_correct"]]
                # Column-wise so that an empty shard still carries the schema.
                shard = Dataset.from_dict({name: [row[name] for row in rows] for name in FEATURES}, features=FEATURES)
                _save_dataset(
                    shard, shard_root / names[i], COMPLETE_MARKER, {"key": key, "samples": len(rows), **counts}
                )
                decoded_now += end - start
    (decoded_now,) = _sum_over_ranks([float(decoded_now)], world_size)
    decode_seconds = time.perf_counter() - decode_began

    # ---- rank 0 merges the shards in order ------------------------------------------------------------------
    if rank == 0 and not current:
        _merge([shard_root / name for name in names], set_dir, manifest)
        for stale in shard_root.glob("shard-*"):
            if stale.name not in names:
                shutil.rmtree(stale, ignore_errors=True)  # shards of an earlier shard count
    if world_size > 1:
        dist.barrier()
    summary = {
        **_read_json(set_dir / MANIFEST_FILE),
        "samples_per_s": decoded_now / max(decode_seconds, 1e-9) if decoded_now else None,
        "decoded_now": int(decoded_now),
        "seconds": time.perf_counter() - began,
    }
    if rank == 0:
        print(summary_line(summary, set_dir))
    return summary


def summary_line(summary: dict, set_dir: Path) -> str:
    """One line: samples, this call's samples/s and seconds, the teacher's accuracy first try and after retries."""
    decoded = max(summary["decoded"], 1)
    if summary["samples_per_s"] is None:
        speed = "up to date, nothing decoded"
    else:
        speed = f"{summary['decoded_now']} decoded at {summary['samples_per_s']:.1f} samples/s"
    return (
        f"[trajectories] {summary['samples']} samples in {summary['seconds']:.1f} s ({speed}); teacher accuracy "
        f"{100 * summary['first_correct'] / decoded:.2f}% first try, {100 * summary['correct'] / decoded:.2f}% "
        f"after {summary['retried']} retries -> {set_dir}"
    )


def trajectories_command(recipe: Recipe) -> dict[str, Any]:
    """`distill trajectories`: build (or reuse) the recipe's data, then generate trajectories for its training
    split with `teacher.path`, else the run's own `<run.output_dir>/teacher`."""
    recipe.trajectories.check_canvas(recipe.data.max_response_tokens)
    out_dir = Path(recipe.run.output_dir)
    datasets = prepare_datasets(recipe, out_dir)
    teacher_dir = recipe.teacher.path or out_dir / "teacher"
    return generate_trajectories(recipe, teacher_dir, training_records(recipe, datasets), out_dir)
