"""The reference's VAE switches on every pipeline that decodes with a MoVQ, an AutoencoderKL or a Paella VQ:
they switch tiling and slicing on the image decoder itself (cascade/models/tiling.py)."""
from __future__ import annotations


class VaeOptions:
    """enable_vae_tiling / enable_vae_slicing and their opposites, for pipelines whose components include an
    image decoder; `for_models` comes from the pipeline base."""

    MISSING = "image decoder (MoVQ, AutoencoderKL or Paella VQ) to tile or slice"

    def enable_vae_tiling(self, tile_size: int = 64, overlap: int = 16) -> None:
        """Decode in tiles of tile_size latent positions (512 px for MoVQ and the SD VAE), overlapping by
        `overlap` and blended: memory stays that of one tile at any image size (cascade/models/tiling.py)."""
        self.for_models("enable_tiling", tile_size, overlap, missing=self.MISSING)

    def disable_vae_tiling(self) -> None:
        self.for_models("disable_tiling", missing=self.MISSING)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (the same images, the memory of one)."""
        self.for_models("enable_slicing", missing=self.MISSING)

    def disable_vae_slicing(self) -> None:
        self.for_models("disable_slicing", missing=self.MISSING)
