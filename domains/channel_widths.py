"""Models whose layer widths may change between rounds: what matched averaging (FedMA) needs.

FedMA (Wang et al. 2020) matches the channels of each site's layer to the global model's by weight
similarity and averages matched channels; a site channel that matches none becomes a new global
channel, so the global model's layers grow. To do that for any network, a domain declares:

- `channel_groups`: the network's matchable channel groups in matching order (input to output),
  each with the weights that *produce* the group's channels and on which axis (a convolution's
  output axis 0, a transposed convolution's axis 1, a normalisation layer's per-channel vectors);
- `channel_layout(widths)`: for every exchanged weight, which of its axes index channels of which
  groups, in order (a decoder convolution whose input is an upsampled group concatenated with an
  encoder group's skip connection has two segments on axis 1);
- `base_widths` (the model's widths before any growth) and `max_widths` (the most a global model
  may grow to): a site builds the model at the widths a request names and its output contract
  admits weights of exactly those shapes, only for widths between the two.

A width group's channels can be permuted or extended without changing the function the model
computes, except for new channels, because every weight that indexes them is listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

Segment = tuple[str | None, int]  # (group name, its width) or (None, a fixed length such as image channels)
Layout = dict[str, dict[int, tuple[Segment, ...]]]  # weight name -> axis -> segments along it


@dataclass(frozen=True)
class ChannelGroup:
    """One matchable set of channels and the weights (name, axis) whose slices along that axis are
    its channels' parameters: what two sites' channels are compared on."""

    name: str
    produced_by: tuple[tuple[str, int], ...]


@runtime_checkable
class ChannelWidths(Protocol):
    base_widths: Mapping[str, int]
    max_widths: Mapping[str, int]
    channel_groups: tuple[ChannelGroup, ...]

    def build_model(self, widths: Mapping[str, int] | None = None) -> torch.nn.Module:
        """The model at `widths` (None: `base_widths`)."""

    def channel_layout(self, widths: Mapping[str, int]) -> Layout:
        """Which axes of which weights index which groups' channels, at `widths`."""


def width_problem(domain: ChannelWidths, widths: object) -> str | None:
    """Why `widths` cannot be built and released (None when they can): every group named, each an
    integer between its base and its maximum width. The message names groups, never data."""
    if not isinstance(widths, Mapping):
        return "widths must be a dict {channel group: width}"
    names = set(domain.base_widths)
    if set(widths) != names:
        unknown = sorted(str(k)[:40] for k in set(widths) - names)
        missing = sorted(names - set(widths))
        return f"widths must name exactly the groups {sorted(names)} (unknown: {unknown}, missing: {missing})"
    for name in sorted(names):
        value = widths[name]
        if type(value) is not int:
            return f"widths['{name}'] must be an integer"
        if not domain.base_widths[name] <= value <= domain.max_widths[name]:
            return (f"widths['{name}'] = {value} is outside {domain.base_widths[name]}-{domain.max_widths[name]}, "
                    "the widths this domain's model may have")
    return None


def segment_slices(segments: tuple[Segment, ...], group: str) -> slice | None:
    """Where `group`'s channels sit along an axis made of `segments` (None if not on it)."""
    start = 0
    for name, length in segments:
        if name == group:
            return slice(start, start + length)
        start += length
    return None
