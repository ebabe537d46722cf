"""Real models' parameter lists for benchmarks, built in code (no downloads), random and never zero.

Exact shapes: ResNet-50 (161 tensors, 25.6 M), ViT-B/16 (152 tensors, 86.6 M),
GPT-2 medium (292 tensors, 355 M; the LM head is tied to the embedding).
``scale`` < 1 shrinks every width for CPU smoke runs while keeping the tensor
count and structure.
"""

from __future__ import annotations

import math

import torch


def _w(width: int, scale: float) -> int:
    return max(1, int(round(width * scale)))


def resnet50_shapes(scale: float = 1.0, classes: int = 1000) -> list[tuple[int, ...]]:
    """Bottleneck ResNet-50: conv weights (no bias), BN affine pairs, the classifier."""
    return resnet_shapes(_w(64, scale), (3, 4, 6, 3), classes)


def resnet_shapes(width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000):
    shapes: list[tuple[int, ...]] = [(width, 3, 7, 7), (width,), (width,)]
    in_ch = width
    for stage, count in enumerate(blocks):
        mid = width * 2**stage
        out = mid * 4
        for block in range(count):
            for shape in ((mid, in_ch, 1, 1), (mid, mid, 3, 3), (out, mid, 1, 1)):
                shapes += [shape, (shape[0],), (shape[0],)]
            if block == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    shapes += [(classes, in_ch), (classes,)]
    return shapes


def vit_b16_shapes(scale: float = 1.0, classes: int = 1000) -> list[tuple[int, ...]]:
    """ViT-B/16 at 224² (torchvision layout): patch embedding, class token, position embedding,
    12 blocks of (LN, fused QKV, projection, LN, MLP), final LN and head."""
    d, mlp, tokens = _w(768, scale), _w(3072, scale), 197
    shapes: list[tuple[int, ...]] = [(1, 1, d), (1, tokens, d), (d, 3, 16, 16), (d,)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (classes, d), (classes,)]
    return shapes


def gpt2_medium_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """GPT-2 medium (Hugging Face layout, Conv1D weights stored in × out)."""
    d, vocab = _w(1024, scale), _w(50257, scale)
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(24):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


WORKLOADS = {"resnet50": resnet50_shapes, "vit_b16": vit_b16_shapes, "gpt2_medium": gpt2_medium_shapes}


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def make_params_and_grads(shapes, dtype=torch.float32, device="cpu"):
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.05 + 0.01)
        p.grad = torch.randn_like(p) * 1e-2 + 1e-4
        params.append(p)
    return params
