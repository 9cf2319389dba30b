"""Write a randomly initialised pair of fewstep backbones for speed benchmarks: a bidirectional diffusion model
and its causal twin (the same weights with causal attention, the AR baseline of the same size).

    python scripts/bench_model.py --out /tmp/bench-1b            # ~1.2B Dream-layout pair (GPU-NOTES.md's shape)
    distill bench decode recipes/bench-1b.yaml teacher.path=/tmp/bench-1b/teacher --ar /tmp/bench-1b/ar \
        --batch-sizes 1,32 --paths eager,static,compiled

Random weights decode nonsense: only times, shapes and agreement between paths mean anything here. The sizes
default to the 1.35B model measured in ../shared/GPU-NOTES.md (hidden 2048, 24 layers, 16 heads, MLP 5504) with
fewstep's character tokenizer, so the embedding is small and the decoder layers are nearly all of the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teachers.interface import new_teacher, save_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for teacher/ and ar/")
    parser.add_argument("--backbone", default="dream", choices=["llada", "dream"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="weights as saved (default bf16)")
    args = parser.parse_args()
    sizes = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.intermediate,
        "max_position_embeddings": args.positions,
    }
    torch.manual_seed(0)
    teacher = new_teacher(args.backbone, sizes)
    if args.dtype == "bf16":
        teacher.model.to(torch.bfloat16)
    parameters = sum(parameter.numel() for parameter in teacher.model.parameters())
    save_teacher(teacher, args.out / "teacher")
    teacher.model.config.causal = True
    save_teacher(teacher, args.out / "ar")
    print(f"{parameters / 1e9:.2f}B parameters ({args.backbone}): {args.out / 'teacher'}, {args.out / 'ar'} (causal)")


if __name__ == "__main__":
    main()
