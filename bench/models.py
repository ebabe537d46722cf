"""ResNet-50 and ViT-B/16 in plain torch (no torchvision), for the end-to-end training-step benchmark.

Their parameter lists are exactly ``workloads.resnet50_shapes()`` and
``workloads.vit_b16_shapes()`` (tests/bench check it); ``scale`` shrinks widths
for CPU smoke runs.
"""

from __future__ import annotations

import torch
from torch import nn

from workloads import _w


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, mid: int, stride: int):
        super().__init__()
        out = 4 * mid
        self.conv1, self.bn1 = nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, scale: float = 1.0, classes: int = 1000):
        super().__init__()
        width = _w(64, scale)
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        layers, in_ch = [], width
        for stage, count in enumerate((3, 4, 6, 3)):
            mid = width * 2**stage
            for block in range(count):
                layers.append(Bottleneck(in_ch, mid, 2 if block == 0 and stage > 0 else 1))
                in_ch = 4 * mid
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.layers(x).mean(dim=(2, 3)))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, mlp: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, d))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViTB16(nn.Module):
    def __init__(self, scale: float = 1.0, classes: int = 1000, image: int = 224):
        super().__init__()
        d, mlp = _w(768, scale), _w(3072, scale)
        heads = 12 if d % 12 == 0 else 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.conv_proj = nn.Conv2d(3, d, 16, 16)
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // 16) ** 2 + 1, d) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(d, mlp, heads) for _ in range(12)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])
