"""Decode a task's eval split with one model and one decoder, and score it by exact match; sweep a decoder's knob.

`evaluate_records` returns accuracy (percent), mean NFE, TPF (total generated tokens / total forward passes, so
long answers weigh more, as in d3LLM's reports), tokens/s (wall time of the decode calls, prompt encoding
included; over ranks, the slowest rank's) at the given batch size, and one log line per sample (prompt, output,
answer, correct, nfe, generated tokens). `sweep_decoder` evaluates a decoder at each value of its knob (an `auto`
sweep stops once accuracy has fallen past AUP's cut-off) and `sweep_status` says whether the curve is complete or
cut short; `report_row` makes a report row of a swept curve. The report is built on them in
`distill/run.py:evaluate_rows`, `eval/benchmarks.py` (the lm-eval sweeps) and `eval/report.py`.

Batches and ranks: the records are cut into batches of `batch_size` in order, and each batch samples from its own
generator (`distill.trajectories.batch_seed`: the run seed, the temperature and the batch's sample ids), so a batch
decodes the same in whichever process decodes it. `evaluate_sharded` (what `sweep_decoder` runs when given
`EvalShards`) spreads one point's batches over a launcher's ranks, batch i to rank i % world_size, so every
per-sample output, NFE and order is the one a single process gives; every rank then reads every batch's results
and scores the same point, so all ranks take the same `auto` sweep decision.

Shard files, the unit of resume and the way results reach every rank, under the eval output directory:

    shards/<row>/<task>/<key>.rank<r>-of-<w>.jsonl   rank r's finished batches of one point (one decoder at one
                                                    knob value): a JSON line per batch, `{"batch", "seconds",
                                                    "samples": [{"id", "output", "correct", "nfe", "generated"}]}`

`key` is the sha256 of what decides the point's outputs: the model (`teachers.fingerprint.checkpoint_fingerprint`
and the dtype it is loaded in), the decoder settings and canvas, batch size, seed, the records' ids, tasks, prompts,
answers and images, and the fewstep version. A file is written to a temp name and renamed (after the rank's share
of the point, and at most every `SAVE_EVERY_S` before that); a rerun reuses every batch a file of any world size
holds for the same key and decodes the others (the progress line says how many batches it reused). The files stay
after the eval as its cache; `EvalShards.prune` removes, per evaluated row and task, the files of points the latest
evaluation did not ask for. Code changes within one fewstep version do not change the key: delete `shards/` to
decode everything again.

The module runs past ~400 lines because decoding in one process and over ranks share the batches, their seeds and
the scoring: kept in one file, the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from distill import __version__
from distill.decoding import decode
from distill.files import write_atomically
from distill.recipe import DecoderConfig, EvalDecoderConfig
from distill.trajectories import batch_seed
from eval.aup import ACCURACY_DROP_LIMIT, fell_past_cutoff
from eval.tasks import is_correct
from teachers.fingerprint import checkpoint_fingerprint
from teachers.interface import Teacher
from teachers.vision import image_sha256

SHARDS_DIR = "shards"  # under the eval output directory (see the module docstring)
SHARD_FORMAT = 1  # part of every shard key: bump it with the line schema, and no key matches an older file
SAVE_EVERY_S = 30.0  # a rank rewrites its shard file at most this often mid-point: a kill loses little work,
# and a share of many batches is not rewritten after each one


@dataclass
class EvalResult:
    task: str
    row: str
    decoder: dict
    samples: int
    accuracy: float  # percent
    nfe: float  # mean forward passes per sample
    tpf: float  # generated tokens / forward passes, over the whole split
    tokens_per_s: float
    seconds: float
    batch_size: int
    logs: list[dict] = field(default_factory=list, repr=False)
    reused_batches: int = 0  # batches whose results came from shard files of an earlier run (`evaluate_sharded`)

    def summary(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "logs"}


def _decode_batch(teacher: Teacher, chunk: list[dict], decoder: DecoderConfig, gen_length: int, seed: int) -> dict:
    """Decode and score one batch: `{"seconds", "samples": [{"id", "output", "correct", "nfe", "generated"}]}`.

    The batch samples from a generator of its own (`batch_seed` of the seed, the temperature and its sample ids),
    so it draws the same noise whichever rank decodes it, and whatever was decoded before it.
    """
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(batch_seed(seed, decoder.temperature, [r["id"] for r in chunk]))
    prompts = [teacher.encode_prompt(r["prompt"], r.get("images") or ()) for r in chunk]
    vision = [prompt.vision for prompt in prompts]
    result = decode(teacher, [prompt.ids for prompt in prompts], decoder, gen_length, generator, vision)
    samples = []
    for index, record in enumerate(chunk):
        output = teacher.decode_response(result.tokens[index].tolist())
        samples.append(
            {
                "id": record["id"],
                "output": output,
                "correct": is_correct(output, record["answer"], record["task"]),
                "nfe": int(result.nfe[index]),
                "generated": int(result.generated[index]),
            }
        )
    return {"seconds": time.perf_counter() - began, "samples": samples}


def _score(
    records: list[dict],
    batches: list[dict],
    decoder: DecoderConfig,
    gen_length: int,
    batch_size: int,
    seconds: float,
    *,
    task: str,
    row: str,
) -> EvalResult:
    """One point's result from its batches (`_decode_batch`, in order): the per-sample logs in record order, each
    with its record's prompt and answer (the batches leave them out), and the totals over the split."""
    logs: list[dict] = []
    for index, batch in enumerate(batches):
        chunk = records[index * batch_size : (index + 1) * batch_size]
        for record, sample in zip(chunk, batch["samples"], strict=True):
            logs.append(
                {
                    "id": record["id"],
                    "prompt": record["prompt"],
                    "output": sample["output"],
                    "answer": record["answer"],
                    "correct": sample["correct"],
                    "nfe": sample["nfe"],
                    "generated": sample["generated"],
                }
            )
    total_nfe = sum(log["nfe"] for log in logs)
    total_generated = sum(log["generated"] for log in logs)
    return EvalResult(
        task=task,
        row=row,
        decoder=decoder.model_dump(mode="json") | {"gen_length": gen_length},
        samples=len(logs),
        accuracy=100.0 * sum(log["correct"] for log in logs) / len(logs),
        nfe=total_nfe / len(logs),
        tpf=total_generated / max(total_nfe, 1),
        tokens_per_s=total_generated / max(seconds, 1e-9),
        seconds=seconds,
        batch_size=batch_size,
        logs=logs,
    )


def evaluate_records(
    teacher: Teacher,
    records: list[dict],
    decoder: DecoderConfig,
    gen_length: int,
    batch_size: int,
    *,
    task: str,
    row: str,
    seed: int = 0,
) -> EvalResult:
    """Decode every record's prompt in batches of `batch_size`, all in this process, and score the outputs."""
    if not records:
        raise ValueError(f"eval: task '{task}' has no eval samples")
    chunks = [records[first : first + batch_size] for first in range(0, len(records), batch_size)]
    batches = [_decode_batch(teacher, chunk, decoder, gen_length, seed) for chunk in chunks]
    seconds = sum(batch["seconds"] for batch in batches)
    return _score(records, batches, decoder, gen_length, batch_size, seconds, task=task, row=row)


def model_identity(checkpoint: Path, dtype: str, strict: bool = False) -> str:
    """What a row's model is, for the shard keys: `teachers.fingerprint.checkpoint_fingerprint` (`strict`: with the
    weights' sha256, `run.strict_hash`) and the dtype it is loaded in. A folder without safetensors weights (which
    the fingerprint needs) is identified by its files' names, sizes and mtimes."""
    checkpoint = Path(checkpoint)
    if any(checkpoint.glob("*.safetensors")):
        return f"{checkpoint_fingerprint(checkpoint, strict=strict)}/{dtype}"
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir() if p.is_file())
    return f"files:{hashlib.sha256(json.dumps(files).encode()).hexdigest()}/{dtype}"


@dataclass
class EvalShards:
    """The shard files of one row and task (`directory`: `SHARDS_DIR/<row>/<task>` under the eval output
    directory, laid out in the module docstring) and this process's place among a launcher's ranks. `model` is
    the row's `model_identity`; `keys` collects the points evaluated through it, which `prune` keeps."""

    directory: Path
    model: str
    rank: int = 0
    world_size: int = 1
    keys: set[str] = field(default_factory=set)

    def key(self, records: list[dict], decoder: DecoderConfig, gen_length: int, batch_size: int, seed: int) -> str:
        """sha256 of what decides a point's outputs (the module docstring lists it)."""
        # The answer and task decide `correct`, so they are part of a record's identity here.
        data = [
            [r["id"], r["task"], r["prompt"], r["answer"], [image_sha256(image) for image in r.get("images") or ()]]
            for r in records
        ]
        identity = {
            "format": SHARD_FORMAT,
            "fewstep_version": __version__,
            "model": self.model,
            "decoder": decoder.model_dump(mode="json"),
            "gen_length": gen_length,
            "batch_size": batch_size,
            "seed": seed,
            "records": hashlib.sha256(json.dumps(data).encode()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def read(self, key: str, records: list[dict], batch_size: int) -> dict[int, dict]:
        """The finished batches of point `key` in the shard files of any world size, by batch index; the first file
        in name order wins, so every rank picks the same. A file that does not parse, or a batch whose sample ids
        are not its records', is left out (decoded again)."""
        found: dict[int, dict] = {}
        for path in sorted(self.directory.glob(f"{key}.*.jsonl")):
            try:
                lines = [json.loads(line) for line in path.read_text().splitlines()]
            except (OSError, ValueError):
                continue
            for line in lines:
                if _fits(line, records, batch_size):
                    found.setdefault(line["batch"], line)
        return found

    def write(self, key: str, batches: dict[int, dict]) -> None:
        """This rank's finished batches of point `key` (those it reused from another world size's file too, so its
        file stands alone) to its shard file, through a temp name and a rename."""
        path = self.directory / f"{key}.rank{self.rank:03d}-of-{self.world_size:03d}.jsonl"
        lines = [
            json.dumps({"batch": index, "seconds": batch["seconds"], "samples": batch["samples"]}) + "\n"
            for index, batch in sorted(batches.items())
        ]
        write_atomically(path, "".join(lines))

    def wait_for_ranks(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def prune(self) -> None:
        """Remove the directory's shard files of points not in `keys` (an older checkpoint, other settings or
        records): the cache holds the latest evaluation of the row and task. Rank 0 alone; no rank reads them."""
        if self.rank != 0 or not self.directory.is_dir():
            return
        for path in self.directory.glob("*.jsonl"):
            if path.name.split(".", 1)[0] not in self.keys:
                path.unlink(missing_ok=True)


def _fits(line: object, records: list[dict], batch_size: int) -> bool:
    """Whether a shard file's line is a finished batch of these records (`EvalShards.write`'s schema)."""
    if not isinstance(line, dict) or not isinstance(line.get("batch"), int) or line["batch"] < 0:
        return False
    if not isinstance(line.get("seconds"), (int, float)) or not isinstance(line.get("samples"), list):
        return False
    chunk = records[line["batch"] * batch_size : (line["batch"] + 1) * batch_size]
    fields = {"id", "output", "correct", "nfe", "generated"}
    samples = line["samples"]
    if not chunk or not all(isinstance(sample, dict) and fields <= sample.keys() for sample in samples):
        return False
    return [sample["id"] for sample in samples] == [record["id"] for record in chunk]


def evaluate_sharded(
    teacher: Teacher,
    records: list[dict],
    decoder: DecoderConfig,
    gen_length: int,
    batch_size: int,
    shards: EvalShards,
    *,
    task: str,
    row: str,
    seed: int = 0,
) -> EvalResult:
    """`evaluate_records` over a launcher's ranks, resumable; every rank calls it and gets the same result.

    The batches are `evaluate_records`' own; rank r decodes the batches i with i % world_size == r that no shard
    file holds yet and writes them to its shard file; after a barrier every rank reads every batch and scores the
    point.
    """
    if not records:
        raise ValueError(f"eval: task '{task}' has no eval samples")
    count = -(-len(records) // batch_size)
    key = shards.key(records, decoder, gen_length, batch_size, seed)
    shards.keys.add(key)
    reused = shards.read(key, records, batch_size)
    # Every rank has read what earlier runs left before any writes this point's files: all see the same reuse.
    shards.wait_for_ranks()
    mine = range(shards.rank, count, shards.world_size)
    done = {index: reused[index] for index in mine if index in reused}
    todo = [index for index in mine if index not in reused]
    saved = time.perf_counter()
    for index in todo:
        chunk = records[index * batch_size : (index + 1) * batch_size]
        done[index] = _decode_batch(teacher, chunk, decoder, gen_length, seed)
        if index == todo[-1] or time.perf_counter() - saved >= SAVE_EVERY_S:
            shards.write(key, done)
            saved = time.perf_counter()
    shards.wait_for_ranks()  # every rank's share is on disk
    found = shards.read(key, records, batch_size)
    missing = [index for index in range(count) if index not in found]
    if missing:
        raise ValueError(f"{shards.directory}: batch {missing[0]} of point {key[:12]} is in no shard file")
    batches = [found[index] for index in range(count)]
    # The point's time is the wall time of its slowest rank: per rank, the decode time of its batches under this
    # world size's split (a batch reused from an earlier run counts the time it took then).
    ranks = range(min(shards.world_size, count))
    seconds = max(sum(batches[index]["seconds"] for index in range(r, count, shards.world_size)) for r in ranks)
    result = _score(records, batches, decoder, gen_length, batch_size, seconds, task=task, row=row)
    result.reused_batches = len(reused)
    return result


def sweep_decoder(
    teacher: Teacher,
    records: list[dict],
    decoder: EvalDecoderConfig,
    gen_length: int,
    batch_size: int,
    *,
    task: str,
    row: str,
    seed: int = 0,
    shards: EvalShards | None = None,
) -> Iterator[tuple[float | int | None, EvalResult]]:
    """Evaluate `decoder` at each value of its knob in turn, yielding `(knob value, result)` as each is measured:
    in this process (`evaluate_records`), or with `shards` over the launcher's ranks (`evaluate_sharded`; every
    rank iterates the sweep and gets the same results).

    An `auto` sweep walks its ladder from one token per forward and stops after the first value whose accuracy
    fell past AUP's cut-off (`eval.aup.fell_past_cutoff`); a pinned list is evaluated whole.
    """
    curve: list[tuple[float, float]] = []
    for knob, setting in decoder.settings(gen_length):
        if shards is None:
            result = evaluate_records(teacher, records, setting, gen_length, batch_size, task=task, row=row, seed=seed)
        else:
            result = evaluate_sharded(
                teacher, records, setting, gen_length, batch_size, shards, task=task, row=row, seed=seed
            )
        yield knob, result
        curve.append((result.tpf, result.accuracy))
        # Every rank holds the same curve (read from the same shard files): the ranks stop together.
        if decoder.sweep == "auto" and fell_past_cutoff(curve):
            return


def sweep_status(decoder: EvalDecoderConfig, gen_length: int, points: list[tuple]) -> dict:
    """How far a row's curve went: `{"sweep": "auto" | "pinned", "one_token_knob", "cut_short", "cut_short_reason"}`.

    `points` are the row's `(knob, tpf, accuracy)`. A curve is complete when it holds the decoder's
    one-token-per-forward value and either its accuracy fell past AUP's cut-off or it reached the fastest value of
    the decoder's ladder (nothing faster left to try); otherwise it is cut short, and the reason says why.
    """
    one_token = decoder.one_token_knob(gen_length)
    knobs = [knob for knob, _, _ in points]
    fastest = decoder.ladder(gen_length)[-1]
    fastest_tried = knobs[0]
    for knob in knobs:
        fastest_tried = knob if decoder.faster_or_equal(knob, fastest_tried) else fastest_tried
    reason = None
    if one_token is None:
        reason = f"no {decoder.knob} value decodes one token per forward (steps is set)"
    elif one_token not in knobs:
        reason = f"does not start at one token per forward ({decoder.knob}={one_token})"
    elif not fell_past_cutoff([(tpf, accuracy) for _, tpf, accuracy in points]) and not decoder.faster_or_equal(
        fastest_tried, fastest
    ):
        tried = f"{decoder.knob}={fastest_tried}"
        reason = f"accuracy had not fallen more than {ACCURACY_DROP_LIMIT:g} points when the sweep stopped ({tried})"
    return {
        "sweep": "auto" if decoder.sweep == "auto" else "pinned",
        "one_token_knob": one_token,
        "cut_short": reason is not None,
        "cut_short_reason": reason,
    }


def report_row(
    name: str,
    decoder: EvalDecoderConfig,
    gen_length: int,
    points: list[dict],
    *,
    run: str,
    hardware: str,
    batch_size: int,
) -> dict:
    """One model's row of the AUP report (`eval/report.py`'s schema, without `aup`) for one decoder: its measured
    `points` (`knob`, `tpf`, `accuracy`, ...) and how far its sweep went (`sweep_status`)."""
    status = sweep_status(decoder, gen_length, [(point["knob"], point["tpf"], point["accuracy"]) for point in points])
    return {
        "name": name,
        "decoder": decoder.report_name,
        "decoder_name": decoder.name,
        "knob_name": decoder.knob,
        # The swept knob varies per point, so it is left out of the shared settings.
        "settings": decoder.model_dump(
            mode="json", exclude={"label", "sweep"} | ({decoder.knob} if decoder.sweep else set())
        ),
        "run": run,
        "hardware": hardware,
        "batch_size": batch_size,
        **status,
        "points": points,
    }


def write_sample_log(logs: list[dict], path: Path) -> None:
    """Per-sample JSONL, written atomically."""
    write_atomically(path, "".join(json.dumps(log) + "\n" for log in logs))
