"""Tokenizers that need no download: CLIP's byte-level BPE over bytes and a few merges (the demo model's
and the tests')."""
from __future__ import annotations

import json
from pathlib import Path


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def byte_tokenizer(folder: Path, max_length: int = 77, merges=("t h", "th e</w>", "c a", "ca t</w>")):
    """A CLIP BPE tokenizer over single bytes (plus a few merges): any text encodes, nothing downloads."""
    from transformers import CLIPTokenizer

    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))  # merges may repeat a token
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
