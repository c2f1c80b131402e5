"""The translation generator: a small 2-D U-Net whose every channel group can be permuted or grown.

[B, 1, H, W] source slice on [0, 1] -> [B, 1, H, W] synthesised target on [0, 1] (sigmoid), H and W
divisible by 4. Five channel groups, one per stage, each produced by one MONAI `Convolution`
(convolution, instance norm, LeakyReLU):

    enc1        3x3 conv of the source                                  H
    enc2        3x3 conv of max-pooled enc1                             H/2
    bottleneck  3x3 conv of max-pooled enc2                             H/4
    dec2        3x3 stride-2 transposed conv of bottleneck              H/2
    dec1        3x3 stride-2 transposed conv of [dec2, enc2]            H
    head        3x3 conv of [dec1, enc1] -> 1 channel, sigmoid

Skip connections concatenate (deeper group first), so a consuming weight's input axis has two
segments. Normalisation is InstanceNorm with a per-channel scale and shift and no running
statistics: it acts on each channel alone, so permuting channels permutes it along (GroupNorm's
groups mix neighbouring channels and would not), and averaged weights need no re-estimated
statistics. Convolutions followed by a norm carry no bias (the norm removes it). This is what
FedMA needs (`domains.channel_widths`): `channel_layout` lists every weight axis indexing a group.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.networks.blocks import Convolution
from torch import nn

from domains.channel_widths import ChannelGroup, Layout

GROUPS = ("enc1", "enc2", "bottleneck", "dec2", "dec1")  # matching order: input to output
BASE_WIDTHS: dict[str, int] = {"enc1": 8, "enc2": 16, "bottleneck": 32, "dec2": 16, "dec1": 8}
# FedMA may grow a group by half its base width (a site channel matching no global one becomes new).
MAX_WIDTHS: dict[str, int] = {name: round(1.5 * width) for name, width in BASE_WIDTHS.items()}
_ACT = ("leakyrelu", {"negative_slope": 0.2})
_NORM = ("instance", {"affine": True})
# The weights that produce each group's channels, and on which axis (transposed convolutions: 1).
_PRODUCER_AXIS = {"enc1": 0, "enc2": 0, "bottleneck": 0, "dec2": 1, "dec1": 1}

CHANNEL_GROUPS: tuple[ChannelGroup, ...] = tuple(
    ChannelGroup(name, ((f"{name}.conv.weight", _PRODUCER_AXIS[name]), (f"{name}.adn.N.weight", 0), (f"{name}.adn.N.bias", 0)))
    for name in GROUPS
)


def _stage(in_channels: int, out_channels: int, transposed: bool) -> Convolution:
    return Convolution(2, in_channels, out_channels, kernel_size=3, strides=2 if transposed else 1, is_transposed=transposed,
                       act=_ACT, norm=_NORM, bias=False)


class TranslationUNet(nn.Module):
    """The generator at `widths` ({group: channels}, every group of `GROUPS`)."""

    def __init__(self, widths: Mapping[str, int]) -> None:
        super().__init__()
        missing = [name for name in GROUPS if name not in widths]
        if missing:
            raise ValueError(f"TranslationUNet needs a width for every channel group {list(GROUPS)}; missing {missing}")
        w = {name: int(widths[name]) for name in GROUPS}
        self.widths = w
        self.enc1 = _stage(1, w["enc1"], transposed=False)
        self.enc2 = _stage(w["enc1"], w["enc2"], transposed=False)
        self.bottleneck = _stage(w["enc2"], w["bottleneck"], transposed=False)
        self.dec2 = _stage(w["bottleneck"], w["dec2"], transposed=True)
        self.dec1 = _stage(w["dec2"] + w["enc2"], w["dec1"], transposed=True)
        self.head = Convolution(2, w["dec1"] + w["enc1"], 1, kernel_size=3, conv_only=True)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"TranslationUNet expects [B, 1, H, W] with H and W divisible by 4, got {tuple(x.shape)}")
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        d2 = self.dec2(self.bottleneck(self.pool(e2)))
        d1 = self.dec1(torch.cat([d2, e2], dim=1))
        return torch.sigmoid(self.head(torch.cat([d1, e1], dim=1)))


def channel_layout(widths: Mapping[str, int]) -> Layout:
    """Every weight axis of `TranslationUNet(widths)` that indexes a group's channels, in order."""
    w = {name: int(widths[name]) for name in GROUPS}
    layout: Layout = {}
    for name in GROUPS:
        layout[f"{name}.adn.N.weight"] = {0: ((name, w[name]),)}
        layout[f"{name}.adn.N.bias"] = {0: ((name, w[name]),)}
    layout["enc1.conv.weight"] = {0: (("enc1", w["enc1"]),)}
    layout["enc2.conv.weight"] = {0: (("enc2", w["enc2"]),), 1: (("enc1", w["enc1"]),)}
    layout["bottleneck.conv.weight"] = {0: (("bottleneck", w["bottleneck"]),), 1: (("enc2", w["enc2"]),)}
    # Transposed convolutions store [in, out, k, k].
    layout["dec2.conv.weight"] = {0: (("bottleneck", w["bottleneck"]),), 1: (("dec2", w["dec2"]),)}
    layout["dec1.conv.weight"] = {0: (("dec2", w["dec2"]), ("enc2", w["enc2"])), 1: (("dec1", w["dec1"]),)}
    layout["head.conv.weight"] = {1: (("dec1", w["dec1"]), ("enc1", w["enc1"]))}
    return layout
