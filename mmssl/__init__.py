"""mmssl: multimodal self-supervised pretraining."""
__version__ = "0.1.0"


def load_encoder(path, modality=None, device="cpu"):
    """Load a ready ``Encoder`` from a run directory or an export (see ``mmssl.export``)."""
    from mmssl.export import load_encoder as _load

    return _load(path, modality=modality, device=device)


__all__ = ["__version__", "load_encoder"]
