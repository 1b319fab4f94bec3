"""Attention slicing and memory-efficient attention: switches every model has, under the reference's names.

They only set `attend_options` on each `models.layers.Attention` inside the model; the maths switch is in
`models.layers.attend`, so no model class carries code for them.
"""
from __future__ import annotations


def slice_rows(heads: int, slice_size) -> int | None:
    """The reference's slice sizes: "auto" = half the heads, "max" = one row, an int as given, None = off."""
    if slice_size == "auto":
        return max(heads // 2, 1)
    if slice_size == "max":
        return 1
    if slice_size is not None and not (isinstance(slice_size, int) and 0 < slice_size <= heads):
        raise ValueError(f"slice_size must be 'auto', 'max', None or an int in [1, {heads}] (the heads of "
                         f"an attention layer), got {slice_size!r}")
    return slice_size


class AttentionOptions:
    """Mixed into every model (loading.ModelMixin)."""

    def attention_layers(self) -> list:
        return [m for m in self.modules() if hasattr(m, "attend_options")]

    def set_attention_slice(self, slice_size="auto") -> None:
        """Attention over `slice_size` (batch x head) rows at a time, to cap memory; None turns it off."""
        layers = self.attention_layers()
        sizes = [slice_rows(layer.heads, slice_size) for layer in layers]  # validate all before changing any
        for layer, size in zip(layers, sizes):
            layer.attend_options["slice_size"] = size

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        for layer in self.attention_layers():
            layer.attend_options.update(memory_efficient=valid, op=attention_op)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """xformers' kernel when installed, else PyTorch's scaled_dot_product_attention (also
        memory-efficient)."""
        self.set_use_memory_efficient_attention_xformers(True, attention_op)

    def disable_xformers_memory_efficient_attention(self) -> None:
        self.set_use_memory_efficient_attention_xformers(False)
