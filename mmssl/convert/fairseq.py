"""fairseq HuBERT, wav2vec 2.0 and data2vec (audio, v1) checkpoints -> mmssl speech encoder exports,
without fairseq and without running anything in the file (``mmssl.convert.unpickle``).

The architecture is read from the checkpoint's ``cfg["model"]`` (Hydra-era files: a dict or a pickled
OmegaConf DictConfig) or ``args`` (an ``argparse.Namespace``, older files), fairseq's defaults filling
keys an older file lacks, and checked against the tensor shapes. Key map (fairseq -> mmssl; i a conv
layer, j a position conv, l a block):

  feature_extractor.conv_layers.i.0.{weight,bias}      -> adapter.feature_extractor.conv_layers.i.conv.*
  feature_extractor.conv_layers.0.2.*   (group_norm)   -> adapter.feature_extractor.conv_layers.0.norm.*
  feature_extractor.conv_layers.i.2.1.* (layer_norm)   -> adapter.feature_extractor.conv_layers.i.norm.*
  layer_norm.*, post_extract_proj.*                    -> adapter.feature_norm.*, adapter.feature_proj.*
  mask_emb                                             -> mask_embedding
  encoder.pos_conv.0.{bias, weight_g|parametrizations.weight.original0, weight_v|...original1}
                                                       -> adapter.content_position.conv.*   (pos_conv_depth 1)
  encoder.pos_conv.j.0.{weight,bias}                   -> adapter.content_position.convs.j.* (data2vec)
  encoder.layer_norm.*                                 -> backbone.norm.*
  encoder.layers.l.self_attn.{q,k,v}_proj.*            -> backbone.blocks.l.attn.qkv.* (concatenated)
  encoder.layers.l.self_attn.out_proj.*                -> backbone.blocks.l.attn.proj.*
  encoder.layers.l.self_attn_layer_norm.*, final_layer_norm.* -> backbone.blocks.l.norm1.*, norm2.*
  encoder.layers.l.fc1.*, fc2.*                        -> backbone.blocks.l.ffn.fc1.*, ffn.fc2.*

Heads: HuBERT's ``final_proj`` and ``label_embs_concat`` go to ``heads/hubert.safetensors`` (the hubert
objective's ``final_proj`` and ``label_embeddings``), data2vec's ``final_proj`` to
``heads/data2vec_head.safetensors``; ``init=`` loads them where the shapes fit. wav2vec 2.0's quantiser
and projections, data2vec's EMA copy and a fine-tuned model's CTC projection are left out and named in
the export's ``skipped``. A fine-tuned checkpoint (``w2v_encoder.w2v_model.*``) converts its encoder."""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from mmssl.convert.common import apply_plan
from mmssl.convert.unpickle import load_checkpoint, plain
from mmssl.errors import BadFileError, ConfigError

#: fairseq's Wav2Vec2Config / HubertConfig / Data2VecAudioConfig defaults for keys older files lack
DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default", "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1,
    "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False, "conv_pos": 128, "conv_pos_groups": 16, "pos_conv_depth": 1, "layer_norm_first": False,
    "logit_temp": 0.1, "untie_final_proj": False,
}
#: fairseq model names (``cfg.model._name`` / ``args.arch``) -> what mmssl calls them
KINDS = {"hubert": "HuBERT", "wav2vec2": "wav2vec 2.0", "data2vec_audio": "data2vec audio"}
#: fine-tuned wrappers around those models: their encoder sits under ``w2v_encoder.w2v_model.``
FINETUNED = ("hubert_ctc", "wav2vec_ctc", "wav2vec2_ctc", "hubert_seq2seq", "wav2vec_seq2seq", "data2vec_audio_ctc")
#: source keys that are not the encoder, left out on purpose (per kind; heads kept are taken first)
SKIP = ("quantizer.", "project_q.", "final_proj.", "target_glu.", "label_embs_concat", "_ema", "w2v_encoder.proj.",
        "ema.", "decoder.")

_FE = "feature_extractor.conv_layers"


@dataclass
class FairseqCheckpoint:
    """What a converter needs from a fairseq ``.pt`` file."""

    path: Path
    model: dict[str, Tensor]
    arch: dict[str, Any]               # the model section of cfg / args, fairseq's defaults filled in
    task: dict[str, Any]
    kind: str                          # hubert | wav2vec2 | data2vec_audio
    config_from: str                   # "cfg" or "args"
    finetuned: str | None = None       # the wrapper's name (hubert_ctc, ...) for a fine-tuned file
    notes: list[str] = field(default_factory=list)
    task_state: dict[str, Any] = field(default_factory=dict)  # HuBERT's label dictionaries, as plain dicts


def looks_like_fairseq(obj: Any) -> bool:
    """A fairseq checkpoint dict: a ``model`` state dict with ``args`` or ``cfg`` beside it."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and ("args" in obj or "cfg" in obj)


def _section(raw: Any) -> dict[str, Any]:
    p = plain(raw)
    return p if isinstance(p, dict) else {}


def read_fairseq(path: str | Path) -> FairseqCheckpoint:
    """Load ``path`` with the allow-listed unpickler and read its model and task config."""
    path = Path(path)
    obj = load_checkpoint(path)
    if not looks_like_fairseq(obj):
        have = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise BadFileError(path, f"not a fairseq checkpoint (a dict with model and args or cfg; this holds {have})")
    cfg, args = obj.get("cfg"), obj.get("args")
    if args is not None:  # older files: one flat Namespace; its arch names the model
        flat, source = _section(args), "args"
        model_cfg, task = dict(flat), flat
        name = str(flat.get("arch") or flat.get("_name") or "")
    else:
        full, source = _section(cfg), "cfg"
        model_cfg, task = _section(full.get("model")), _section(full.get("task"))
        name = str(model_cfg.get("_name") or "")
    sd = {k: v for k, v in obj["model"].items() if isinstance(v, Tensor)}
    finetuned = None
    if name in FINETUNED or any(k.startswith("w2v_encoder.w2v_model.") for k in sd):
        finetuned = name or "fine-tuned"
        inner = _section(model_cfg.get("w2v_args"))
        # w2v_args: the pretrained model's cfg (model + task) or, from an args-era model, its Namespace
        model_cfg = _section(inner.get("model")) if "model" in inner else inner
        name = str(model_cfg.get("_name") or model_cfg.get("arch") or "")
        sd = {k.removeprefix("w2v_encoder.w2v_model."): v for k, v in sd.items()}
    kind = _kind(name, sd)
    if kind is None:
        raise ConfigError(f"{path}: fairseq model {name or '(unnamed)'!r} has no mmssl converter; these convert: "
                          f"{', '.join(f'{k} ({v})' for k, v in KINDS.items())}")
    arch = {**DEFAULTS, **{k: v for k, v in model_cfg.items() if v is not None}}
    if kind == "data2vec_audio" and "pos_conv_depth" not in model_cfg:
        arch["pos_conv_depth"] = 5  # Data2VecAudioConfig's default (conv_pos 95 over 5 convs)
    return FairseqCheckpoint(path, sd, arch, task, kind, source, finetuned, task_state=_section(obj.get("task_state")))


def _kind(name: str, sd: dict[str, Tensor]) -> str | None:
    """hubert | wav2vec2 | data2vec_audio from the model name, else from the keys (an args-era file may
    name its arch variant: wav2vec2_large, hubert_base, ...)."""
    for k in KINDS:
        if name == k or name.startswith(k + "_"):
            return k
    if name and name not in ("", "fine-tuned"):
        return None
    if "label_embs_concat" in sd:
        return "hubert"
    return "wav2vec2" if f"{_FE}.0.0.weight" in sd else None


# -- the architecture ---------------------------------------------------------------------------------
def conv_spec(text: str) -> list[tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string (``"[(512, 10, 5)] + [(512, 3, 2)] * 4 + ..."``) -> the
    (channels, kernel, stride) list, evaluated over list/tuple literals with + and * only (no eval)."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(type(node).__name__)

    try:
        spec = ev(ast.parse(str(text), mode="eval"))
        out = [(int(c), int(k), int(s)) for c, k, s in spec]
    except (SyntaxError, ValueError, TypeError) as e:
        raise ConfigError(f"conv_feature_layers {text!r} is not a list of (channels, kernel, stride): {e}") from None
    return out


def _refuse(ck: FairseqCheckpoint, what: str) -> ConfigError:
    return ConfigError(f"{ck.path}: this fairseq {KINDS[ck.kind]} cannot be converted exactly: {what}")


def speech_config(ck: FairseqCheckpoint) -> dict[str, Any]:
    """An mmssl speech ``encoder_config`` from the checkpoint's config, checked against its tensors."""
    from mmssl.factory import encoder_config
    from mmssl.modalities.speech.adapter import CONV_SHAPE
    from mmssl.sizes import SIZES

    a, sd = ck.arch, ck.model
    spec = conv_spec(a["conv_feature_layers"])
    if [(k, s) for _, k, s in spec] != list(CONV_SHAPE):
        raise _refuse(ck, f"conv_feature_layers {a['conv_feature_layers']!r}; mmssl's front-end is "
                          f"(kernel, stride) {CONV_SHAPE}")
    if a["activation_fn"] != "gelu":
        raise _refuse(ck, f"activation_fn={a['activation_fn']!r}; mmssl uses gelu")
    if a["layer_type"] != "transformer":
        raise _refuse(ck, f"layer_type={a['layer_type']!r} (conformer blocks); mmssl's are transformer blocks")
    if a["extractor_mode"] not in ("default", "layer_norm"):
        raise _refuse(ck, f"extractor_mode={a['extractor_mode']!r}")
    if "post_extract_proj.weight" not in sd:
        raise _refuse(ck, "no post_extract_proj (front-end width equal to the model width)")
    dim, depth = int(a["encoder_embed_dim"]), int(a["encoder_layers"])
    shapes = {"encoder_embed_dim": (int(sd["post_extract_proj.weight"].shape[0]), dim),
              "encoder_layers": (_count(sd, "encoder.layers"), depth)}
    if "encoder.layers.0.fc1.weight" in sd:
        shapes["encoder_ffn_embed_dim"] = (int(sd["encoder.layers.0.fc1.weight"].shape[0]), int(a["encoder_ffn_embed_dim"]))
    for key, (have, said) in shapes.items():
        if have != said:
            raise BadFileError(ck.path, f"its config says {key}={said} but its tensors have {have}")
    numbers = {"dim": dim, "depth": depth, "heads": int(a["encoder_attention_heads"]),
               "ffn_dim": int(a["encoder_ffn_embed_dim"])}
    size = next((n for n, s in SIZES.items() if s == numbers), None)
    speech = OmegaConf.to_container(OmegaConf.load(resources.files("mmssl.configs") / "modality" / "speech.yaml"))
    backbone = {**numbers, "norm_first": bool(a["layer_norm_first"]), "eps": 1e-5,  # fairseq's LayerNorm eps
                "dropout": float(a["dropout"]), "attn_dropout": float(a["attention_dropout"]),
                "ffn_dropout": float(a["activation_dropout"]), "layer_drop": float(a["encoder_layerdrop"])}
    cfg = encoder_config("speech", size or "base", speech, backbone)  # type: ignore[arg-type]
    if size is None:
        cfg["size"] = f"{depth}x{dim}"  # no mmssl size has these numbers: say what it is
    widths = [c for c, _, _ in spec]
    pos_depth = int(a["pos_conv_depth"])
    # fairseq's stack of position convs shares conv_pos over its depth (kernel at least 3)
    kernel = int(a["conv_pos"]) if pos_depth == 1 else max(3, int(a["conv_pos"]) // pos_depth)
    cfg["adapter"].update(
        frontend_channels=widths[0] if len(set(widths)) == 1 else widths,
        frontend_norm="group_norm" if a["extractor_mode"] == "default" else "layer_norm",
        frontend_bias=bool(a["conv_bias"]), position="conv", pos_conv_kernel=kernel,
        pos_conv_groups=int(a["conv_pos_groups"]), pos_conv_depth=pos_depth, feature_dropout=float(a["dropout_input"]))
    if bool(ck.task.get("normalize", False)):
        # fairseq's dataset layer-norms each waveform (F.layer_norm(wav, wav.shape): zero mean, unit
        # variance over the utterance, eps 1e-5) before the model: the adapter's waveform_normalize
        cfg["adapter"]["waveform_normalize"] = True
    return cfg


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    """Numbered sub-modules under ``prefix`` (max index + 1): one missing key cannot hide itself."""
    from mmssl.convert.common import count_indexed

    return count_indexed(sd, prefix)


def key_plan(cfg: dict[str, Any], sd: dict[str, Tensor]) -> list[tuple[str, list[str]]]:
    """(mmssl key, fairseq keys) for an encoder config: one key is copied, q/k/v are concatenated."""
    a = cfg["adapter"]
    norm, bias = a["frontend_norm"], bool(a["frontend_bias"])
    plan: list[tuple[str, list[str]]] = []
    fe = "adapter.feature_extractor.conv_layers"
    for i in range(7):
        for p in ("weight", "bias") if bias else ("weight",):
            plan.append((f"{fe}.{i}.conv.{p}", [f"{_FE}.{i}.0.{p}"]))
        for p in ("weight", "bias"):
            if norm == "group_norm" and i == 0:
                plan.append((f"{fe}.0.norm.{p}", [f"{_FE}.0.2.{p}"]))
            elif norm == "layer_norm":
                plan.append((f"{fe}.{i}.norm.{p}", [f"{_FE}.{i}.2.1.{p}"]))
    for p in ("weight", "bias"):
        plan.append((f"adapter.feature_norm.{p}", [f"layer_norm.{p}"]))
        plan.append((f"adapter.feature_proj.{p}", [f"post_extract_proj.{p}"]))
        plan.append((f"backbone.norm.{p}", [f"encoder.layer_norm.{p}"]))
    plan.append(("mask_embedding", ["mask_emb"]))
    if int(a["pos_conv_depth"]) == 1:
        pos = "encoder.pos_conv.0"
        plan.append(("adapter.content_position.conv.bias", [f"{pos}.bias"]))
        # torch's old weight_norm (weight_g, weight_v) or its parametrizations: the same two tensors
        legacy = f"{pos}.weight_g" in sd
        for n, old in (("original0", "weight_g"), ("original1", "weight_v")):
            plan.append((f"adapter.content_position.conv.parametrizations.weight.{n}",
                         [f"{pos}.{old}" if legacy else f"{pos}.parametrizations.weight.{n}"]))
    else:
        for j in range(int(a["pos_conv_depth"])):
            for p in ("weight", "bias"):
                plan.append((f"adapter.content_position.convs.{j}.{p}", [f"encoder.pos_conv.{j}.0.{p}"]))
    for layer in range(int(cfg["backbone"]["depth"])):
        src, dst = f"encoder.layers.{layer}", f"backbone.blocks.{layer}"
        for p in ("weight", "bias"):
            plan.append((f"{dst}.attn.qkv.{p}", [f"{src}.self_attn.{x}_proj.{p}" for x in "qkv"]))
            plan.append((f"{dst}.attn.proj.{p}", [f"{src}.self_attn.out_proj.{p}"]))
            plan.append((f"{dst}.norm1.{p}", [f"{src}.self_attn_layer_norm.{p}"]))
            plan.append((f"{dst}.ffn.fc1.{p}", [f"{src}.fc1.{p}"]))
            plan.append((f"{dst}.ffn.fc2.{p}", [f"{src}.fc2.{p}"]))
            plan.append((f"{dst}.norm2.{p}", [f"{src}.final_layer_norm.{p}"]))
    return plan


def _problems(path: Path, unused: list[str], unfilled: list[str]) -> BadFileError:
    parts = []
    if unused:
        parts.append(f"{len(unused)} keys not used ({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''})")
    if unfilled:
        parts.append(f"{len(unfilled)} mmssl keys not filled ({', '.join(unfilled[:4])}"
                     f"{', ...' if len(unfilled) > 4 else ''})")
    return BadFileError(path, "cannot convert the fairseq model: " + "; ".join(parts))


def encoder_state(ck: FairseqCheckpoint, cfg: dict[str, Any], enc: nn.Module | None = None) -> dict[str, Tensor]:
    """The mmssl Encoder state dict (strict) from the checkpoint's tensors; every source key is used or
    a known head, every mmssl parameter filled with the right shape, else one error naming them.
    ``enc``: the encoder built from ``cfg``, if the caller has one."""
    from mmssl.factory import build_encoder

    sd = ck.model
    state, unused, unfilled = apply_plan(sd, key_plan(cfg, sd), SKIP)
    if any(u.startswith("mask_embedding ") for u in unfilled):
        # a fine-tuned file without one: HuBERT's uniform init, seeded
        unfilled = [u for u in unfilled if not u.startswith("mask_embedding ")]
        state["mask_embedding"] = torch.rand(int(cfg["backbone"]["dim"]), generator=torch.Generator().manual_seed(0))
    if unused or unfilled:
        raise _problems(ck.path, unused, unfilled)
    enc = enc if enc is not None else build_encoder(cfg)
    template = enc.state_dict()
    buffers = {k for k, _ in enc.named_buffers()}  # constants from the config (filterbanks), not weights
    unfilled = [k for k in template if k not in state and k not in buffers]
    unfilled += [f"{k} (shape {tuple(state[k].shape)}, mmssl needs {tuple(template[k].shape)})"
                 for k in state if k in template and state[k].shape != template[k].shape]
    extra = [k for k in state if k not in template]
    if extra or unfilled:
        raise _problems(ck.path, extra, unfilled)
    return {k: state.get(k, v).to(v.dtype).contiguous() for k, v in template.items()}


# -- heads ----------------------------------------------------------------------------------------------
def _unit_rows(ck: FairseqCheckpoint, rows: int) -> tuple[list[int] | None, str]:
    """Which rows of ``label_embs_concat`` are units 0..k-1, in order: fairseq's label ``Dictionary``
    (``task_state``) puts its special symbols (``<s>``, ``<pad>``, ``</s>``, ``<unk>``) first and the
    units in the order of ``dict.km.txt``; a label ``u`` is row ``indices[str(u)]``. -> (rows or None,
    what was done, for the note)."""
    dicts = ck.task_state.get("dictionaries") or ck.task_state.get("target_dictionary")
    dicts = [d for d in (dicts if isinstance(dicts, list) else [dicts]) if isinstance(d, dict)]
    if not dicts or not all(isinstance(d.get("symbols"), list) for d in dicts):
        return None, "no label Dictionary in task_state: every row kept in the file's order"
    sizes = [len(d["symbols"]) for d in dicts]
    if sum(sizes) != rows:
        return None, f"label dictionaries of {sizes} symbols for {rows} rows: every row kept in the file's order"
    d = dicts[0]
    nspecial = int(d.get("nspecial", 4))
    symbols = [str(x) for x in d["symbols"][nspecial:]]
    k = len(symbols)
    if sorted(symbols) != sorted(str(u) for u in range(k)):
        return None, "label symbols are not the unit ids 0..k-1: every row kept in the dictionary's order"
    index = {str(x): i for i, x in enumerate(d["symbols"])}
    more = f", label set 1 of {len(dicts)}" if len(dicts) > 1 else ""
    return [index[str(u)] for u in range(k)], f"{nspecial} special symbols dropped, rows in unit-id order{more}"


def hubert_head(ck: FairseqCheckpoint) -> tuple[nn.Module | None, str]:
    """HuBERT's projection and unit embeddings as the hubert objective's ``hubert`` head (``final_proj``,
    ``label_embeddings``), or None with why (an untied projection per label set does not fit). Row ``u``
    of ``label_embeddings`` is unit ``u``'s embedding, read through the checkpoint's label dictionary
    (``_unit_rows``), so mmssl's unit ids index it as fairseq's label ids index ``label_embs_concat``."""
    sd = ck.model
    if "label_embs_concat" not in sd or "final_proj.weight" not in sd:
        return None, "no final_proj / label_embs_concat"
    emb, w = sd["label_embs_concat"], sd["final_proj.weight"]
    if bool(ck.arch.get("untie_final_proj")) or w.shape[0] != emb.shape[1]:
        return None, (f"final_proj {tuple(w.shape)} projects to several label sets (untied); its heads are "
                      f"not converted (mmssl's several codebooks, objective.k=[...], start fresh)")
    rows, how = _unit_rows(ck, int(emb.shape[0]))
    if rows is not None:
        emb = emb[rows]
    head = nn.Module()
    head.final_proj = nn.Linear(int(w.shape[1]), int(w.shape[0]))
    head.label_embeddings = nn.Parameter(emb.detach().clone().float())
    with torch.no_grad():
        head.final_proj.weight.copy_(w)
        head.final_proj.bias.copy_(sd["final_proj.bias"])
    head.config = {"converted_from": "fairseq.hubert", "k": int(emb.shape[0]), "final_dim": int(emb.shape[1]),
                   "logit_temp": float(ck.arch.get("logit_temp", 0.1)), "label_rows": how}
    return head, ""


def data2vec_head(ck: FairseqCheckpoint) -> nn.Module | None:
    """data2vec's regression head (``final_proj``: D -> D) as the data2vec objective's ``data2vec_head``."""
    sd = ck.model
    if "final_proj.weight" not in sd:
        return None
    w = sd["final_proj.weight"]
    head = nn.Linear(int(w.shape[1]), int(w.shape[0]))
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(sd["final_proj.bias"])
    return head


def describe(ck: FairseqCheckpoint, cfg: dict[str, Any]) -> str:
    """One line: what was detected."""
    b, a = cfg["backbone"], cfg["adapter"]
    tuned = f", fine-tuned ({ck.finetuned})" if ck.finetuned else ""
    return (f"fairseq {KINDS[ck.kind]}{tuned} (config from {ck.config_from}): {b['depth']} layers x {b['dim']}, "
            f"{b['heads']} heads, FFN {b['ffn_dim']}, {a['frontend_norm']} front-end"
            f"{' with conv bias' if a['frontend_bias'] else ''}, {'pre' if b['norm_first'] else 'post'}-norm, "
            f"position conv {a['pos_conv_kernel']}/{a['pos_conv_groups']} x{a['pos_conv_depth']}")


def convert_fairseq(src: Path, out: Path, kv: dict[str, str]) -> Path:
    """``mmssl convert SRC OUT format=fairseq``: the encoder export (``model.safetensors`` +
    ``config.json``) and the heads that fit an mmssl objective under ``OUT/heads/``."""
    from mmssl.export import save_encoder, save_heads
    from mmssl.factory import build_encoder

    src, out = Path(src), Path(out)
    ck = read_fairseq(src)
    cfg = speech_config(ck)
    enc = build_encoder(cfg)
    enc.load_state_dict(encoder_state(ck, cfg, enc), strict=True)
    heads: dict[str, nn.Module] = {}
    kept, why_not = [], ""
    if ck.kind == "hubert":
        head, why_not = hubert_head(ck)
        if head is not None:
            heads["hubert"] = head
            kept.append(f"heads/hubert (final_proj {tuple(head.final_proj.weight.shape[::-1])}, "
                        f"{head.config['k']} unit embeddings: {head.config['label_rows']}; "
                        f"logit_temp {head.config['logit_temp']})")
    elif ck.kind == "data2vec_audio" and (d2v := data2vec_head(ck)) is not None:
        heads["data2vec_head"] = d2v
        kept.append("heads/data2vec_head (final_proj)")
    taken = {"final_proj.weight", "final_proj.bias", "label_embs_concat"} if heads else set()
    skipped = sorted({k.split(".")[0] for k in ck.model if k.startswith(SKIP) and k not in taken})
    normalize = bool(ck.task.get("normalize", False))
    extra = {"converted_from": f"fairseq.{ck.kind}", "source": str(src), "skipped": skipped,
             # fairseq's task normalised each waveform (zero mean, unit variance) before the model
             "source_waveform_normalize": normalize}
    if ck.finetuned:
        extra["source_finetuned"] = ck.finetuned
    save_encoder(enc, out, extra=extra)
    if heads:
        save_heads(heads, out / "heads")
    print(f"mmssl: {src}: {describe(ck, cfg)}", file=sys.stderr)
    notes = ["kept: encoder" + "".join(f", {k}" for k in kept)]
    if skipped:
        notes.append(f"left out: {', '.join(skipped)}" + (f" ({why_not})" if why_not else ""))
    if normalize:
        applied = bool(getattr(enc.adapter, "waveform_normalize", False))
        notes.append("the source model was trained on per-utterance normalised waveforms (task.normalize): "
                     + ("the encoder applies it (adapter.waveform_normalize)" if applied else
                        "feed it F.layer_norm(wav, wav.shape) per utterance (this mmssl's speech adapter does not)"))
    print("mmssl: " + "; ".join(notes), file=sys.stderr)
    return out
