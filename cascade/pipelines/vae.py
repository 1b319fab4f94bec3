"""The reference's VAE switches on every pipeline that decodes with a MoVQ, an AutoencoderKL or a Paella VQ:
they switch tiling and slicing on the image decoder itself (cascade/models/tiling.py)."""
from __future__ import annotations


class VaeOptions:
    """enable_vae_tiling / enable_vae_slicing and their opposites, for pipelines whose components include an
    image decoder; `modules()` comes from the pipeline base."""

    def image_decoders(self) -> list:
        decoders = [m for m in self.modules().values() if hasattr(m, "enable_tiling")]
        if not decoders:
            raise ValueError(f"{type(self).__name__} has no image decoder (MoVQ, AutoencoderKL or Paella VQ) "
                             f"to tile or slice")
        return decoders

    def enable_vae_tiling(self, tile_size: int = 64, overlap: int = 16) -> None:
        """Decode in tiles of tile_size latent positions (512 px for MoVQ and the SD VAE), overlapping by
        `overlap` and blended: memory stays that of one tile at any image size (cascade/models/tiling.py)."""
        for m in self.image_decoders():
            m.enable_tiling(tile_size, overlap)

    def disable_vae_tiling(self) -> None:
        for m in self.image_decoders():
            m.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (the same images, the memory of one)."""
        for m in self.image_decoders():
            m.enable_slicing()

    def disable_vae_slicing(self) -> None:
        for m in self.image_decoders():
            m.disable_slicing()
