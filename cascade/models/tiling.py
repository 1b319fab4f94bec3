"""Decoding large latents in overlapping tiles, and batches one sample at a time, for any image decoder.

A decoder's activations grow with the image (MoVQ's last up block holds 128 channels at full resolution,
about 2 GB a tensor at 2048 px), its output only by three channels. Tiles of the latents are decoded one by
one and blended across their overlaps, so the weights sum to one everywhere and no tile edge shows. Group
norms and the mid-block attention see one tile, not the whole image, so a tiled decode differs from the
untiled one (larger tiles, smaller differences). Whole-image group-norm statistics estimated by repeated
passes over the tiles were tried: closer on the trained demo MoVQ, diverging on random-weight VAEs, so
not kept. Paella's decoder has only local operations and tiles almost exactly.
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, size): a stride of tile - overlap, the last flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def ramp(length: int, tile: int, rising: bool, falling: bool, device, dtype) -> torch.Tensor:
    """A tile's blending weights along one axis, at each side that meets another tile: zero over the first
    quarter of the overlap (where the tile's edge padding reaches), linear over its middle half, so a
    neighbour's mirrored ramp completes it to one."""
    w = torch.ones(tile, device=device, dtype=dtype)
    edge = ((torch.arange(length, device=device, dtype=dtype) + 0.5 - length / 4) / (length / 2)).clamp(0, 1)
    if rising:
        w[:length] = edge
    if falling:
        w[tile - length:] = torch.minimum(w[tile - length:], edge.flip(0))
    return w


def blend_tiles(decode: Callable, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """decode(z) computed over tiles of tile x tile latents overlapping by `overlap`, blended."""
    h, w = z.shape[-2:]
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            part = decode(z[..., y:y + tile, x:x + tile])
            f = part.shape[-1] // min(tile, w)  # pixels per latent
            if out is None:
                out = part.new_zeros((*part.shape[:2], h * f, w * f))
                weight = part.new_zeros((h * f, w * f))
            th, tw = part.shape[-2:]
            wy = ramp(overlap * f, th, i > 0, i < len(rows) - 1, part.device, part.dtype)
            wx = ramp(overlap * f, tw, j > 0, j < len(cols) - 1, part.device, part.dtype)
            mask = wy[:, None] * wx[None, :]
            out[..., y * f:y * f + th, x * f:x * f + tw] += part * mask
            weight[y * f:y * f + th, x * f:x * f + tw] += mask
    return out / weight


class TiledDecoding:
    """`enable_tiling` / `enable_slicing` switches for an autoencoder whose decode goes through `decoded`."""

    use_tiling: bool = False
    use_slicing: bool = False
    tile_size, tile_overlap = 64, 16

    def enable_tiling(self, tile_size: int = 64, overlap: int = 16) -> None:
        """Decode latents larger than tile_size (in latent positions) in tiles overlapping by `overlap`."""
        if not isinstance(tile_size, int) or tile_size < 2:
            raise ValueError(f"tile_size: expected an integer of at least 2, got {tile_size!r}")
        if not isinstance(overlap, int) or not 0 < overlap <= tile_size // 2:
            raise ValueError(f"overlap: expected an integer in [1, tile_size // 2 = {tile_size // 2}], "
                             f"got {overlap!r}")
        self.use_tiling, self.tile_size, self.tile_overlap = True, tile_size, overlap

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Decode a batch one sample at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def decoded(self, z: torch.Tensor, decode: Callable) -> torch.Tensor:
        """decode(z), sliced over the batch and tiled over space as switched on."""
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self.decoded(part, decode) for part in z.split(1)])
        if self.use_tiling and max(z.shape[-2:]) > self.tile_size:
            return blend_tiles(decode, z, self.tile_size, self.tile_overlap)
        return decode(z)
