"""Turning task records into token ids and training batches, with exactly the chat format decoding uses.

`encode_records` is the only place a record becomes ids: the prompt goes through `Teacher.encode_prompt` (the
chat format) and the response through `Teacher.encode_response` (answer + EOS), so training, trajectories and
evaluation can never disagree about where the response starts. `first_unusable` checks records against a
tokenizer and the model's positions before any work starts, with the same two functions.

`SequencePool.batch(index)` builds a training micro-batch deterministically from its global index (the trainer's
determinism contract): `[prompt | response | answer padding]` rows, right-padded to a common width, with the rows'
images (Dimple) as `pixel_values`/`image_grid_thw` in row order. An example keeps its images, not their patches
(a 7B-sized image is thousands of patches); `Teacher.vision_inputs` preprocesses them when a batch takes them.

Answer padding is Dimple's fix for length bias: each response is followed by a uniformly random number of pad
tokens so that its canvas ends anywhere between the EOS and `max_response_tokens`; those pads are real targets (the
model learns to fill a canvas tail with them). Batch padding beyond that is masked out of attention and loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from teachers.interface import Teacher
from teachers.vision import VisionInputs, collate_vision, written_vision_token


@dataclass
class EncodedExample:
    prompt: list[int]
    response: list[int]  # answer ids + EOS
    task: str = ""
    images: tuple[Image.Image, ...] = ()  # the prompt's images; `prompt` holds their vision tokens


def encode_records(teacher: Teacher, records, max_response_tokens: int) -> list[EncodedExample]:
    """Tokenize records (dicts with `prompt`, `response`); a response longer than the canvas is an error."""
    examples = []
    for record in records:
        response = teacher.encode_response(record["response"])
        if len(response) > max_response_tokens:
            raise ValueError(
                f"data.max_response_tokens: record {record.get('id', '?')} needs {len(response)} response tokens "
                f"(answer + EOS), more than {max_response_tokens}"
            )
        images = tuple(record.get("images") or ())
        prompt = teacher.encode_prompt(record["prompt"], images).ids
        examples.append(EncodedExample(prompt=prompt, response=response, task=record.get("task", ""), images=images))
    return examples


def first_unusable(
    teacher: Teacher, records, canvas: int, positions: int | None, max_response_tokens: int | None = None
) -> tuple[dict, str] | None:
    """The first record this teacher cannot take, and why (one line); None when every record fits.

    A record is refused when it has images and the teacher no vision tower, when its prompt holds a vision token
    as text (a Dimple teacher places them for the images), when its prompt or response holds a character the
    tokenizer cannot encode (it would silently become the unknown token), when its response (answer + end of turn)
    needs more than `max_response_tokens` (None: not checked; evaluation never encodes responses), or when its
    prompt plus the `canvas`-token response needs more than the model's `positions` (None: not checked). Only the
    teacher's tokenizer and image processor are used, so `teacher.model` may be None.
    """
    tokenizer = teacher.tokenizer
    records = list(records)
    for record in records:
        if record.get("images") and not teacher.backbone.images:
            return record, f"has images, but the teacher ({teacher.name}) has no vision tower; use a dimple teacher"
        written = written_vision_token(record["prompt"])
        if written is not None and teacher.backbone.images:
            return record, f"prompt holds {written} as text (image tokens are placed for the record's images)"
    if tokenizer.unk_token_id is not None:
        # Checked character by character: the tokenizers that have an unknown token (the character tokenizer of
        # the embedded teacher) map each character they lack to it; byte-level ones have none to map to.
        characters = set("".join(record["prompt"] + record["response"] for record in records))
        lacking = {c for c in characters if tokenizer.unk_token_id in tokenizer.encode(c, add_special_tokens=False)}
        for record in records if lacking else ():
            for field in ("prompt", "response"):
                found = next((c for c in record[field] if c in lacking), None)
                if found is not None:
                    return record, (
                        f"{field} holds {found!r} (U+{ord(found):04X}), which the teacher's tokenizer cannot encode "
                        f"(it would become {tokenizer.unk_token})"
                    )
    # A text has at most as many tokens as UTF-8 bytes, plus a leading-space token; +2 more cover the end token
    # (responses) or the chat markup splitting differently around the question than around "" (prompts). Only
    # records near a limit are tokenized exactly: tokenizing every record would take seconds on a large set.
    overhead = len(teacher.encode_prompt("").ids) if positions is not None else 0
    for record in records:
        if max_response_tokens is not None and len(record["response"].encode()) + 2 > max_response_tokens:
            needed = len(teacher.encode_response(record["response"]))
            if needed > max_response_tokens:
                return record, (
                    f"response needs {needed} tokens (answer + end of turn), more than data.max_response_tokens "
                    f"{max_response_tokens}"
                )
        # Image prompts are encoded exactly: their vision blocks are not in the text (about 0.5 ms per small image).
        near = overhead + len(record["prompt"].encode()) + 3 + canvas > positions if positions is not None else False
        if positions is not None and (near or record.get("images")):
            needed = len(teacher.encode_prompt(record["prompt"], record.get("images") or ()).ids)
            if needed + canvas > positions:
                return record, (
                    f"prompt of {needed} tokens plus the {canvas}-token response canvas needs {needed + canvas} "
                    f"positions, more than the model's {positions}"
                )
    return None


class SequencePool:
    """Deterministic micro-batches from a fixed list of examples.

    Batch `index` on rank `rank` is drawn with `random.Random((seed, rank, index))`, so a resumed run sees exactly
    the batches the uninterrupted run saw. Each micro-batch comes from one task (chosen with probability
    proportional to its size): tasks differ a lot in prompt length, and mixing them would pad every row of a
    batch to the longest task's width.
    """

    def __init__(
        self,
        examples: list[EncodedExample],
        micro_batch_size: int,
        max_response_tokens: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        pad_answers: bool = True,
        vision_fn: Callable[[tuple[Image.Image, ...]], VisionInputs] | None = None,
    ):
        if not examples:
            raise ValueError("data: no training examples")
        self.groups: dict[str, list[EncodedExample]] = {}
        for example in examples:
            self.groups.setdefault(example.task, []).append(example)
        self.micro_batch_size = micro_batch_size
        self.max_response_tokens = max_response_tokens
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.pad_answers = pad_answers
        self.vision_fn = vision_fn
        if vision_fn is None and any(example.images for example in examples):
            raise ValueError("data: examples carry images but the pool has no vision_fn to preprocess them")

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` and `response_mask` (1 on response + answer padding), all `[B, T]`; plus
        `pixel_values` and `image_grid_thw` when a row has images."""
        rng = random.Random(f"{self.seed}-{self.rank}-{index}")
        groups = list(self.groups.values())
        group = rng.choices(groups, weights=[len(g) for g in groups])[0]
        chosen = [group[rng.randrange(len(group))] for _ in range(self.micro_batch_size)]
        rows = []
        for example in chosen:
            extra = self.max_response_tokens - len(example.response)
            padding = rng.randint(0, extra) if self.pad_answers else 0
            rows.append((example.prompt, example.response + [self.pad_id] * padding))
        width = max(len(prompt) + len(response) for prompt, response in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, response) in enumerate(rows):
            length = len(prompt) + len(response)
            input_ids[row, :length] = torch.tensor(prompt + response)
            attention_mask[row, :length] = 1
            response_mask[row, len(prompt) : length] = 1
        vision = collate_vision([self.vision_fn(e.images) if e.images else None for e in chosen])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask} | vision
