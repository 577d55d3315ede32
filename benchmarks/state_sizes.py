"""State size per method on the ViT-B/32 and Llama-1B shapes of ``benchmarks/compare.py``.

    .venv/bin/python benchmarks/state_sizes.py

Counted from the tensor shapes (no weights are made): every continual method keeps one
float32 state tensor D per merged tensor; ``regmean`` adds, for each ``nn.Linear`` weight
[d_out, d_in] with a Gram, the slots A [d_in, d_in] and B [d_in, d_out]; ``fisher`` adds
the summed weights (the tensor's shape) for every tensor with a Fisher. Statistics files
(``mergeflow_stats.safetensors``) per checkpoint: Grams alone, Fisher alone, both. The
Linear weights are the 2-D weights that are not embeddings (the projection rule's names),
plus ``lm_head`` for Llama.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import clip_vit_b32, llama_1b

GIB = 2**30


def sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    n = sum(_numel(s) for s in shapes.values())
    linear = [s for k, s in shapes.items() if len(s) == 2 and "embed" not in k]
    gram = sum(s[1] * s[1] for s in linear)
    b = sum(s[1] * s[0] for s in linear)
    d = 4 * n
    return {
        "parameters (M)": n / 1e6,
        "opcm, task_arithmetic, ties, magmax, weight_average, adamerging": d / GIB,
        "regmean (D + A + B)": (d + 4 * (gram + b)) / GIB,
        "fisher (D + weight)": 2 * d / GIB,
        "stats file: Grams": 4 * gram / GIB,
        "stats file: Fisher": 4 * n / GIB,
    }


def _numel(s: tuple[int, ...]) -> int:
    out = 1
    for x in s:
        out *= x
    return out


def main() -> int:
    rows = {
        "ViT-B/32 (CLIP vision)": sizes(clip_vit_b32()),
        "Llama-1B (TinyLlama shapes)": sizes(llama_1b()),
    }
    names = list(next(iter(rows.values())))
    print("| | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        unit = "" if name.startswith("parameters") else " (GiB)"
        print(f"| {name}{unit} | " + " | ".join(f"{r[name]:.3f}" for r in rows.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
