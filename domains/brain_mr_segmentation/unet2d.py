"""A small 2D U-Net for slice-wise tumour segmentation.

Small on purpose: federated rounds ship the weights between hospitals and train on CPUs, and
the phantom volumes are 64x64. Normalisation layers are plain `nn.BatchNorm2d` modules (state
keys contain ".bn") so that FedBN can keep them local to each site.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU: [B, C_in, H, W] -> [B, C_out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class UNet2D(nn.Module):
    """U-Net with `depth` poolings: input [B, in_channels, H, W] -> logits [B, out_channels, H, W].

    H and W must be divisible by 2**depth (8 for the default depth 3) so that the skip
    connections line up. Channels double at each level: base, 2*base, ..., base * 2**depth at
    the bottleneck. Outputs are logits; apply a sigmoid for probabilities.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList([ConvBlock(in_channels, widths[0])] + [ConvBlock(widths[i], widths[i + 1]) for i in range(depth - 1)])
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[depth - 1], widths[depth])
        self.upsamples = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.decoders = nn.ModuleList([ConvBlock(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        if x.ndim != 4 or x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"UNet2D expects [B, C, H, W] with H and W divisible by {multiple}, got {tuple(x.shape)}")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamples, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)
