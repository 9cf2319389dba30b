"""Pseudo-trajectory distillation (d3LLM): student inputs rebuilt from the teacher's unmasking order, and the loss.

A trajectory record holds the prompt ids, the canvas targets y (`target_ids`, L tokens: reference or teacher
tokens, pad-filled) and the teacher's order o (`order[j]` = the step at which the teacher unmasked position j when
decoding block by block, one token per forward; -1 where it never did, e.g. after the EOS, read as "last").
One training sample:

1. a window [s, s + W) of the canvas, W from the curriculum, s a multiple of W;
2. t ~ U[floor, t_max], floor from the curriculum (it rises linearly over training);
3. the window shows the teacher's state at step k = s + int((1 - t) * W): position j is clean iff o_j < k; the
   prefix before the window is clean, everything after it masked;
4. the complementary input inverts the mask inside the window (a second forward);
5. the loss (composed from `distill.losses` in `distill/distill.py`) is
   [CE(m) + CE(not m) + lambda * (H(m) + H(not m))] / 4 on the window's masked positions, H the certainty forcing
   entropy at temperature 0.5 on positions the student already predicts correctly.

Because a teacher that decodes block by block spends exactly one step per position, the steps of a window
aligned with its blocks start at s, so k - s = int((1 - t) * W) positions of the window are clean.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from teachers.vision import VisionInputs, collate_vision


@dataclass(frozen=True)
class Curriculum:
    """Mask-ratio floor rising linearly over training, and a window size per epoch.

    - `floor_start` -> `floor_end`: the floor of t at the first and last micro-batch (d3LLM: 0 -> 0.8).
    - `t_max`: the upper bound of t (d3LLM: 0.8).
    - `windows`: window size for epoch 0, 1, ...; the last one holds afterwards (d3LLM: 16, 24, 32).
    """

    floor_start: float = 0.0
    floor_end: float = 0.8
    t_max: float = 0.8
    windows: tuple[int, ...] = (16, 24, 32)

    def floor(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        return self.floor_start + (self.floor_end - self.floor_start) * progress

    def window(self, epoch: int) -> int:
        return self.windows[min(epoch, len(self.windows) - 1)]


class TrajectoryBatches:
    """Deterministic micro-batches of (masked, complementary) student inputs built from trajectory records.

    `batch(index)` depends only on `(seed, rank, index)` (the trainer's determinism contract). `total_batches` is
    the number of micro-batches the run will draw on this rank; progress through it raises the mask floor, and
    the epoch (records seen / records) picks the window.
    """

    def __init__(
        self,
        records: list[dict],
        micro_batch_size: int,
        total_batches: int,
        curriculum: Curriculum,
        mask_token_id: int,
        pad_token_id: int,
        seed: int,
        rank: int = 0,
        vision_fn: Callable[[list], VisionInputs] | None = None,
    ):
        if not records:
            raise ValueError("trajectories: no records to train on")
        if vision_fn is None and any(record.get("images") for record in records):
            raise ValueError("trajectories: records carry images but the batches have no vision_fn to preprocess them")
        self.vision_fn = vision_fn
        self.records = records
        self.canvas = len(records[0]["target_ids"])
        for window in curriculum.windows:
            if self.canvas % window:
                raise ValueError(
                    f"distill.curriculum.windows: window {window} does not divide the {self.canvas}-token canvas"
                )
        for record in records:
            if len(record["target_ids"]) != self.canvas or len(record["order"]) != self.canvas:
                raise ValueError(f"trajectories: record {record.get('sample_id', '?')} has a different canvas length")
        self.micro_batch_size = micro_batch_size
        self.total_batches = max(total_batches, 1)
        self.curriculum = curriculum
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.rank = rank

    def schedule(self, index: int) -> tuple[float, int]:
        """(mask floor, window) at micro-batch `index`."""
        epoch = index * self.micro_batch_size // len(self.records)
        return self.curriculum.floor(index / self.total_batches), self.curriculum.window(epoch)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors `[B, P + L]`: `input_ids`, `complement_ids`, `targets`, `attention_mask`, `masked`,
        `complement_masked` (loss positions of each forward), `canvas_mask` (1 on the response canvas), plus `[B]`
        `t` and scalar `floor` / `window`; `pixel_values`/`image_grid_thw` when a row's prompt has images
        (a record's `images`, resolved from its `image_sha256` by the distillation stage)."""
        rng = random.Random(f"{self.seed}-{self.rank}-{index}")
        floor, window = self.schedule(index)
        rows = []
        for _ in range(self.micro_batch_size):
            record = self.records[rng.randrange(len(self.records))]
            start = window * rng.randrange(self.canvas // window)
            t = rng.uniform(floor, self.curriculum.t_max) if floor < self.curriculum.t_max else self.curriculum.t_max
            rows.append((record, start, t))
        width = max(len(record["prompt_ids"]) for record, _, _ in rows) + self.canvas
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        complement_ids = input_ids.clone()
        targets = input_ids.clone()
        attention_mask = torch.zeros(shape, dtype=torch.long)
        masked = torch.zeros(shape, dtype=torch.bool)
        complement_masked = torch.zeros(shape, dtype=torch.bool)
        canvas_mask = torch.zeros(shape, dtype=torch.long)
        canvas_mask[:, width - self.canvas :] = 1
        t_values = torch.zeros(len(rows))
        for row, (record, start, t) in enumerate(rows):
            prompt = record["prompt_ids"]
            # Left padding, as decoding does, so the canvas always sits at the end of the row.
            offset = width - self.canvas - len(prompt)
            canvas_from = width - self.canvas
            sequence = torch.tensor(list(prompt) + list(record["target_ids"]), dtype=torch.long)
            targets[row, offset:] = sequence
            attention_mask[row, offset:] = 1
            order = torch.tensor(record["order"], dtype=torch.long)
            order = torch.where(order < 0, torch.full_like(order, self.canvas * 4), order)
            position = torch.arange(self.canvas)
            in_window = (position >= start) & (position < start + window)
            step = start + int((1 - t) * window)
            clean_in_window = in_window & (order < step)
            canvas_masked = (in_window & ~clean_in_window) | (position >= start + window)
            complement = (in_window & clean_in_window) | (position >= start + window)
            masked[row, canvas_from:] = in_window & canvas_masked
            complement_masked[row, canvas_from:] = in_window & complement
            canvas_ids = targets[row, canvas_from:]
            mask_fill = torch.full_like(canvas_ids, self.mask_token_id)
            input_ids[row] = targets[row]
            complement_ids[row] = targets[row]
            input_ids[row, canvas_from:] = torch.where(canvas_masked, mask_fill, canvas_ids)
            complement_ids[row, canvas_from:] = torch.where(complement, mask_fill, canvas_ids)
            t_values[row] = t
        return {
            "input_ids": input_ids,
            "complement_ids": complement_ids,
            "targets": targets,
            "attention_mask": attention_mask,
            "masked": masked,
            "complement_masked": complement_masked,
            "canvas_mask": canvas_mask,
            "t": t_values,
            "floor": torch.tensor(floor),
            "window": torch.tensor(window),
        } | collate_vision([self.vision_fn(r["images"]) if r.get("images") else None for r, _, _ in rows])
