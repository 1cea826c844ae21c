"""An open_clip image or text tower behind mmssl's Encoder contract.

A modality config (``configs/modality/image.yaml`` or ``text.yaml``) may carry

    open_clip: {model: ViT-B-32, weights: null}        # a named open_clip architecture
    open_clip: {model_cfg: {embed_dim: 64, vision_cfg: {...}, text_cfg: {...}}}   # or one written out

and ``mmssl.factory.build_encoder`` then builds an ``OpenClipTower`` instead of an mmssl ``Encoder``.
The image tower is open_clip's ``VisionTransformer`` (what ``CLIP.visual`` is), the text tower its
``TextTransformer`` (the text half of ``CLIP``: token and positional embeddings, the causal
transformer, ``ln_final``, ``text_projection``; a ``CustomTextCLIP``'s ``.text``), both built by
open_clip's own tower builders from the model config, as ``open_clip.create_model(name,
pretrained=None)`` builds them: random init, nothing is downloaded.

``weights`` (optional) is a local file holding the state dict of a whole open_clip model (CLIP or
CustomTextCLIP layout; ``.safetensors`` read with safetensors, anything else with
``torch.load(weights_only=True)``); the tower's part of it is loaded strictly.

The pooled output is open_clip's own (CLS / eot token, ``ln_post`` / ``ln_final``, projection), so
``embed`` equals ``CLIP.encode_image`` / ``encode_text`` and ``dim`` is the model's ``embed_dim``.
Inputs are mmssl batches: ``image`` float [B, 3, S, S] in [0, 1] (normalised here with the model's
mean and std; S must be the model's image size, which ``preprocessing["max_len"]`` tells the codec),
``text`` int64 [B, L] open_clip BPE ids (mmssl's text codec uses open_clip's tokenizer) padded here
with 0 to the context length, as ``open_clip.tokenize`` pads.

The state dict is the tower's part of a CustomTextCLIP state dict (``visual.*`` or ``text.*``), so an
export's weights read back into open_clip by name."""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmssl.backbone import BackboneConfig
from mmssl.types import Batch, EncoderOutput

MODALITIES_WITH_TOWERS = ("image", "text")
#: top-level names of the text half of a CLIP (non-custom-text) state dict
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "cls_emb")
#: open_clip's OPENAI_DATASET_MEAN / STD (the default of its named models)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# -- configs ---------------------------------------------------------------------------------------------
def resolve_model_cfg(oc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The ``open_clip:`` entry -> (label, open_clip model config {embed_dim, vision_cfg, text_cfg, ...}).

    ``model_cfg`` (written out) wins over ``model`` (a name from open_clip's bundled model_configs), so
    an export, which stores the resolved ``model_cfg``, rebuilds the same architecture whatever
    open_clip's bundled configs say later."""
    if oc.get("model_cfg"):
        cfg = copy.deepcopy(dict(oc["model_cfg"]))
        name = str(oc.get("model") or "custom")
    else:
        name = oc.get("model")
        if not name:
            raise ValueError("open_clip tower: set open_clip.model (a named architecture, e.g. ViT-B-32) "
                             "or open_clip.model_cfg")
        name = str(name)
        if ":" in name:  # hf-hub: / local-dir: schemas would read or download configs elsewhere
            raise ValueError(f"open_clip.model {name!r}: give a bundled architecture name or a model_cfg, "
                             "not an hf-hub:/local-dir: source")
        import open_clip

        cfg = open_clip.get_model_config(name)
        if cfg is None:
            models = open_clip.list_models()
            vits = ", ".join(m for m in models if m.startswith("ViT"))[:300]
            raise ValueError(f"unknown open_clip model {name!r}; e.g. {vits}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"open_clip model config {name!r} lacks {missing}")
    return name, cfg


def _tower_cfg(cls: type, d: dict[str, Any], what: str) -> Any:
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"open_clip {what}: {e}") from None


def build_tower(modality: str, model_cfg: dict[str, Any]) -> nn.Module:
    """open_clip's own image tower (``VisionTransformer``) or text tower (``TextTransformer``) of a model
    config, randomly initialised as ``create_model(..., pretrained=None)`` initialises it."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
    from open_clip.transformer import TextTransformer, VisionTransformer

    from mmssl.modalities.text.data import VOCAB_SIZE

    embed_dim, quick = int(model_cfg["embed_dim"]), bool(model_cfg.get("quick_gelu", False))
    if modality == "image":
        vcfg = _tower_cfg(CLIPVisionCfg, model_cfg["vision_cfg"], "vision_cfg")
        if vcfg.timm_model_name or not isinstance(vcfg.layers, int):
            raise ValueError("open_clip image towers: only open_clip's own ViT (VisionTransformer) is supported, "
                             "not timm or ResNet towers")
        tower = _build_vision_tower(embed_dim, vcfg, quick)
        if not isinstance(tower, VisionTransformer):
            raise ValueError(f"open_clip image tower is a {type(tower).__name__}, not a VisionTransformer")
        if tower.image_size[0] != tower.image_size[1]:
            raise ValueError(f"open_clip image tower of {tower.image_size}: mmssl's codec makes square images")
        return tower
    if modality == "text":
        tcfg = _tower_cfg(CLIPTextCfg, model_cfg["text_cfg"], "text_cfg")
        if tcfg.hf_model_name or tcfg.hf_tokenizer_name or tcfg.vocab_size != VOCAB_SIZE:
            raise ValueError("open_clip text towers: only models on open_clip's own BPE tokenizer (vocab "
                             f"{VOCAB_SIZE}) are supported, which is what mmssl's text codec produces")
        tower = _build_text_tower(embed_dim, tcfg, quick)
        if not isinstance(tower, TextTransformer):
            raise ValueError(f"open_clip text tower is a {type(tower).__name__}, not a TextTransformer")
        return tower
    raise ValueError(f"open_clip towers exist for {', '.join(MODALITIES_WITH_TOWERS)}, not {modality!r}")


# -- weights ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A whole open_clip model's state dict from a local file: ``.safetensors`` with safetensors, else
    ``torch.load(weights_only=True)`` (a training checkpoint's ``state_dict`` entry and DDP's
    ``module.`` prefix are unwrapped, as open_clip's ``load_state_dict`` does)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"open_clip weights {p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p))
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles with code, truncated files: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"open_clip weights {p}: not readable with torch.load(weights_only=True): "
                             f"{first}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"open_clip weights {p}: not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def tower_state(sd: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """The image (``visual.*``) or text part of a whole-model state dict, with the tower's own names.
    The text part is ``text.*`` in a CustomTextCLIP and top-level names in a CLIP."""
    if modality == "image":
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if any(k.startswith("text.") for k in sd):
        return {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    return {k: v for k, v in sd.items() if k.split(".", 1)[0] in TEXT_PARTS}


def load_tower_weights(tower: nn.Module, modality: str, path: str | Path) -> None:
    """Load the tower's part of an open_clip model's weights strictly; a mismatch is a one-line error."""
    sub = tower_state(read_state_dict(path), modality)
    if not sub:
        raise ValueError(f"open_clip weights {path} hold no {modality} tower ("
                         f"{'visual.*' if modality == 'image' else 'text.* or token_embedding/transformer/...'} keys)")
    own = tower.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    shapes = [f"{k} {tuple(sub[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(sub))
              if sub[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"open_clip weights {path} do not fit the {modality} tower: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, shapes {shapes[:3]}")
    tower.load_state_dict(sub, strict=True)


# -- the classical baseline, views and preprocessing -------------------------------------------------
class TowerInputs:
    """What evaluators ask of an Encoder's ``adapter``: ``name``, ``baseline_features``, ``views`` and
    ``preprocessing``. The first two delegate to mmssl's adapter of the modality (raw pixels pooled to
    8 x 8; a hashed bag of words), built width 4 and kept out of the tower's modules and state dict:
    they read the batch only."""

    def __init__(self, modality: str, preprocessing: dict[str, Any], adapter_cfg: dict[str, Any]) -> None:
        from mmssl.registry import MODALITIES

        self.name = modality
        self._preprocessing = preprocessing
        self._delegate = MODALITIES.get(modality)(4, adapter_cfg)

    def baseline_features(self, batch: Batch) -> torch.Tensor:
        """The modality's classical feature (image: raw pixels pooled to 8 x 8; text: hashed bag of words)."""
        return self._delegate.baseline_features(batch)

    def views(self, batch: Batch, n_global: int, n_local: int) -> list[Batch]:
        return self._delegate.views(batch, n_global, n_local)

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        return self._delegate.num_tokens(batch)

    def probe_variants(self) -> dict[str, Any]:
        """No named views of the data (the linear probe's hook; see ModalityAdapter.probe_variants)."""
        return {}

    def preprocessing(self) -> dict[str, Any]:
        return dict(self._preprocessing)


# -- the tower -------------------------------------------------------------------------------------------
class OpenClipTower(nn.Module):
    """An open_clip image or text tower with the Encoder interface the objectives and evaluators use.

    ``embed(batch) -> [B, dim]`` is open_clip's pooled, projected output (dim = embed_dim);
    ``forward(batch) -> EncoderOutput``: ``last`` [B, N, W] the final tokens after the final norm
    (image: the patch tokens; text: every position of the padded context, ``pad`` marking those after
    each text's eot), ``layers`` each block's tokens, ``prefix`` [B, 1, dim] the pooled output (the
    feature cache's "cls" feature; ``pool`` is "cls"). Token masking is refused: open_clip's towers
    have no mask embedding and contrastive objectives do not mask."""

    pool = "cls"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        modality = cfg["modality"]
        oc = dict(cfg["open_clip"])
        name, model_cfg = resolve_model_cfg(oc)
        tower = build_tower(modality, model_cfg)
        self.modality = modality
        self.tower_name = "visual" if modality == "image" else "text"
        self.add_module(self.tower_name, tower)  # state dict: visual.* / text.* (CustomTextCLIP's names)
        weights = oc.get("weights")
        if weights:
            load_tower_weights(tower, modality, weights)
        blocks = tower.transformer.resblocks
        width = int(tower.transformer.width)
        self.dim = int(model_cfg["embed_dim"])
        self.width = width
        heads = int(blocks[0].attn.num_heads) if hasattr(blocks[0].attn, "num_heads") else 0
        mlp = blocks[0].mlp
        ffn = int(mlp.c_fc.out_features) if hasattr(mlp, "c_fc") else 4 * width
        # what evaluators and the trainer read (layer_drop, norm_first); describes, never builds
        self.backbone_cfg = BackboneConfig(dim=width, depth=len(blocks), heads=heads, ffn_dim=ffn, norm_first=True)
        if modality == "image":
            pre = model_cfg.get("preprocess_cfg") or {}
            mean = [float(v) for v in oc.get("mean") or pre.get("mean") or OPENAI_MEAN]
            std = [float(v) for v in oc.get("std") or pre.get("std") or OPENAI_STD]
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
            side, patch = int(tower.image_size[0]), int(tower.patch_size[0])
            preprocessing = {"image_size": side, "patch_size": patch, "mean": mean, "std": std, "max_len": side,
                             "value_range": [0.0, 1.0]}
            delegate = {**(cfg.get("adapter") or {}), "patch_size": patch, "image_size": side, "mean": mean,
                        "std": std, "position": "learned"}
        else:
            from mmssl.modalities.text.data import EOT, SOT, TOKENIZER_NAME

            ctx = int(tower.context_length)
            preprocessing = {"tokenizer": TOKENIZER_NAME, "vocab_size": int(tower.vocab_size), "context_length": ctx,
                             "max_len": ctx, "sot_id": SOT, "eot_id": EOT, "pad_id": 0, "specials_masked": False}
            delegate = {**(cfg.get("adapter") or {}), "context_length": ctx, "vocab_size": int(tower.vocab_size)}
        preprocessing["open_clip"] = name
        self.adapter = TowerInputs(modality, preprocessing, delegate)
        # A parameter-free stand-in for "this encoder has a pooled (cls) output" where the tower has no
        # prefix parameter of its own (text): evaluators test ``encoder.prefix is not None``.
        self.register_buffer("_pooled_marker", torch.zeros(0), persistent=False)
        # The export rebuilds from the resolved model config and its own weights: ``weights`` is
        # cleared (the file need not exist where the export is loaded) and kept as ``initialised_from``.
        stored = {**oc, "model": name, "model_cfg": model_cfg, "weights": None,
                  "initialised_from": str(weights) if weights else oc.get("initialised_from")}
        # backbone, adapter and pool describe the tower as built (the modality yaml's describe mmssl's own)
        self.config = {**cfg, "open_clip": stored, "backbone": asdict(self.backbone_cfg), "adapter": delegate,
                       "pool": self.pool, "num_prefix": 0, "preprocessing": self.adapter.preprocessing()}

    @property
    def tower(self) -> nn.Module:
        return getattr(self, self.tower_name)

    @property
    def depth(self) -> int:
        return len(self.tower.transformer.resblocks)

    @property
    def backbone(self) -> nn.Module:
        # eval finetune's layer-wise lr decay, drop path, freezing and LoRA address mmssl's
        # ``backbone.blocks`` by name; an open_clip tower has other names, so say so instead of letting
        # layer decay silently put every tower weight in layer 0
        raise TypeError("open_clip towers have no mmssl backbone: eval finetune (layer decay, drop path, freezing, "
                        "LoRA) does not support them yet; use linear-probe, knn, layer-probe, retrieval or zero-shot")

    @property
    def prefix(self) -> torch.Tensor:
        """The pooled token's own parameter (image: the class embedding; text: the CLS embedding of
        towers with one), else an empty buffer: never None, as every open_clip tower pools."""
        own = getattr(self.tower, "class_embedding", None) if self.modality == "image" else self.tower.cls_emb
        return own if own is not None else self._pooled_marker

    # -- inputs ------------------------------------------------------------------------------------------
    def _image(self, batch: Batch) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] (or uint8) -> normalised, in the tower's dtype."""
        img = batch["image"]
        side = self.visual.image_size[0]
        if img.dim() != 4 or img.shape[1] != 3 or tuple(img.shape[-2:]) != (side, side):
            raise ValueError(f"open_clip image tower takes [B, 3, {side}, {side}] images, got {tuple(img.shape)}: "
                             f"crop to its preprocessing max_len ({side})")
        if not img.is_floating_point():
            img = img.float() / 255.0
        img = (img.float() - self.mean) / self.std
        return img.to(self.visual.conv1.weight.dtype)

    def _text(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] -> (ids [B, context] zero-padded as open_clip.tokenize pads, pad [B, context]
        True after each text's eot). Without ``text_len`` a text ends at its eot (the largest id)."""
        ids = batch["text"].long()
        L = ids.shape[1]
        ctx = int(self.text.context_length)
        if L > ctx:
            raise ValueError(f"text of {L} tokens exceeds the open_clip context length {ctx}: crop it in the data "
                             f"pipeline (max_len <= {ctx})")
        if "text_len" in batch:
            lengths = batch["text_len"].to(ids.device).long()
        else:
            lengths = ids.argmax(1) + 1
        pos = torch.arange(ctx, device=ids.device)[None]
        pad = pos >= lengths[:, None]
        ids = torch.nn.functional.pad(ids, (0, ctx - L)).masked_fill(pad, 0)
        return ids, pad

    # -- the Encoder interface ---------------------------------------------------------------------------
    def embed(self, batch: Batch, layer: int = -1) -> torch.Tensor:
        """Pooled features [B, dim]: layer=-1 is open_clip's output (``encode_image`` /
        ``encode_text``, projection included); layer=i in [0, depth) is block i's tokens averaged over
        the real tokens ([B, width]: the image's patch tokens, the text's tokens up to its eot)."""
        if not -1 <= layer < self.depth:
            raise ValueError(f"layer must be -1 (final output) or 0..{self.depth - 1}, got {layer}")
        if layer == -1:
            if self.modality == "image":
                return self.visual(self._image(batch))
            return self.text(self._text(batch)[0])
        out = self.forward(batch, return_layers=True)
        h = out.layers[layer]
        w = (~out.pad).to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, batch: Batch, token_mask: torch.Tensor | None = None, mask_mode: str = "drop",
                return_layers: bool = False, return_ffn: bool = False) -> EncoderOutput:
        if token_mask is not None:
            raise ValueError("open_clip towers take no token mask (no mask embedding, no token dropping): "
                             "use an mmssl encoder for masked objectives")
        if return_ffn:
            raise ValueError("open_clip towers do not expose their FFN outputs (data2vec targets)")
        take = None if return_layers else 1  # open_clip's indices: None = every block, 1 = the last one
        if self.modality == "image":
            img = self._image(batch)
            r = self.visual.forward_intermediates(img, indices=take, output_fmt="NLC")
            inter, pooled, norm = r["image_intermediates"], r["image_features"], self.visual.ln_post
            B, N = inter[-1].shape[:2]
            g = self.visual.grid_size
            rr, cc = torch.meshgrid(torch.arange(g[0], device=img.device), torch.arange(g[1], device=img.device),
                                    indexing="ij")
            index = torch.stack([rr.reshape(-1), cc.reshape(-1)], -1)[None].expand(B, -1, -1)
            pad = torch.zeros(B, N, dtype=torch.bool, device=img.device)
        else:
            ids, pad = self._text(batch)
            r = self.text.forward_intermediates(ids, indices=take, output_fmt="NLC")
            inter, pooled, norm = r["text_intermediates"], r["text_features"], self.text.ln_final
            B, N = ids.shape
            index = torch.arange(N, device=ids.device)[None, :, None].expand(B, -1, -1)
        h = inter[-1]
        # the final norm over the tokens, where it normalises the transformer's width (it does unless
        # the image tower pools attentionally, where ln_post acts after the pooler)
        fits = isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (h.shape[-1],)
        last = norm(h) if fits else h
        return EncoderOutput(last=last, pad=pad, index=index, layers=list(inter) if return_layers else [],
                             prefix=pooled[:, None])
