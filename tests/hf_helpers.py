"""Shared by the Hugging Face / timm converter and exporter tests: perturbing every tensor of a
reference model away from its initial value, tiny configs, and a place to record measured figures."""
from __future__ import annotations

import torch
from torch import nn

#: tiny transformers speech config (conv widths, 2 blocks, 32 wide)
SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              conv_dim=(16, 24, 16, 16, 16, 16, 32), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
              hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, feat_proj_dropout=0.0)
#: tiny transformers ViT config (32 x 32 images, 8 x 8 patches)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8)
TOL = 1e-4  # the bound on every layer's max abs difference (fp32)


def perturb(model: nn.Module, seed: int = 1, skip: tuple[str, ...] = (), params_only: bool = False) -> nn.Module:
    """Move every floating tensor of the state dict (parameters and persistent buffers, weight-norm gains,
    LayerNorms, zero biases, fixed position tables) away from its initial value, in place, and check that
    none kept it: a dropped key then shows as a difference. ``params_only``: leave buffers alone (mmssl's
    are constants computed from the config: filterbanks, windows)."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters()) if params_only else model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            if not t.is_floating_point() or name.endswith(skip) or any(s in name for s in skip):
                continue
            before = t.clone()
            scale = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 1.0
            t.add_(0.1 * scale * torch.randn(t.shape, generator=g) + 0.05 * torch.randn(t.shape, generator=g))
            assert not torch.equal(before, t), name
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def report(name: str, diffs: list[float]) -> float:
    """Print the figure the docs quote (run pytest with -s) and return the worst layer's."""
    worst = max(diffs)
    print(f"\nmax|diff| {name}: {worst:.2e} over {len(diffs)} outputs")
    return worst
