"""Parameter lists for benchmarks, built in code (no downloads), random and never zero."""

from __future__ import annotations

import torch


def resnet_like_shapes(width: int = 16, blocks: tuple[int, ...] = (1, 1, 1, 1), classes: int = 10) -> list[tuple[int, ...]]:
    """Shapes of a bottleneck ResNet (conv weights, BN affine pairs, the classifier).

    With width=64, blocks=(3, 4, 6, 3), classes=1000 these are ResNet-50's
    161 tensors (25.6 M parameters); smaller settings keep CPU runs short.
    """
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


def make_params_and_grads(shapes, dtype=torch.float32, device="cpu"):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.1 + 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2 + 1e-4
    return params
