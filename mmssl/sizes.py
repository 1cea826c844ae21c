"""Model sizes, the same names for every modality (DESIGN.md "Model sizes").

tiny/small/base equal timm's vit_{tiny,small,base}_patch16_224 backbones; base is also HuBERT Base's
transformer (768 wide, 12 blocks, 12 heads, FFN 3072), so weights convert. micro is the CPU default."""
from __future__ import annotations

from mmssl.errors import UnknownNameError

SIZES: dict[str, dict[str, int]] = {
    "micro": {"dim": 256, "depth": 4, "heads": 4, "ffn_dim": 1024},
    "tiny": {"dim": 192, "depth": 12, "heads": 3, "ffn_dim": 768},
    "small": {"dim": 384, "depth": 12, "heads": 6, "ffn_dim": 1536},
    "base": {"dim": 768, "depth": 12, "heads": 12, "ffn_dim": 3072},
}


def size_spec(name: str) -> dict[str, int]:
    if name not in SIZES:
        raise UnknownNameError(f"unknown model size {name!r}; choose one of: {', '.join(SIZES)}")
    return dict(SIZES[name])
