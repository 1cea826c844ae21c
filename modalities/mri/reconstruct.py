"""Synthesise the contrasts a case lacks with a pretrained MRI masked autoencoder, as NIfTI.

The whole MAE objective comes back from its run (``mmssl.run.load_run_objective``: encoder, decoder,
prediction head). Every contrast slot of the case is tokenised; the tokens of the contrasts to
synthesise are hidden, so the encoder reads only the contrasts the case has (drop masking, as in
pretraining, where whole contrasts are hidden), and the decoder, given the positions of every
contrast's tokens, predicts the hidden ones. The predicted patches are put back together into a
volume on the model grid, mapped back to the case's own voxels (``data.from_grid``: the steps of
``read_case`` undone) and written with the case's (canonical) affine.

Values are z-scores within the head, the units of the model's inputs: a missing contrast has no
scanner scale to return to. This needs raw voxel targets (``adapter.norm_pix: false``, the MRI default);
a model trained on per-patch normalised targets predicts each patch's shape without its mean and
scale and is refused."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmssl.modalities.mri.adapter import MRIAdapter, unpatchify3d
from mmssl.modalities.mri.data import from_grid, read_case, write_nifti


@torch.no_grad()
def reconstruct(run_dir: str | Path, src_case_folder: str | Path, out_dir: str | Path, device: str = "cpu",
                contrasts: list[str] | tuple[str, ...] | None = None, checkpoint: str = "last") -> dict[str, Any]:
    """Write ``<out_dir>/<contrast>.nii.gz`` for every contrast the case lacks (or for ``contrasts``,
    which may name present ones: they are hidden from the model and re-synthesised, and their mean
    squared error against the real one, in z-score units inside the head, is reported).

    -> {"case", "present", "synthesised", "written": {contrast: path}, "mse": {contrast: float},
    "grid"}."""
    from mmssl.run import load_run_objective

    obj = load_run_objective(run_dir, checkpoint, device)
    if not hasattr(obj, "decode") or not hasattr(obj, "decoder_pred"):
        raise ValueError(f"{run_dir} is a {getattr(obj, 'name', type(obj).__name__)} run; reconstruction needs "
                         f"a masked autoencoder (objective=mae)")
    enc = obj.encoder
    ad = enc.adapter
    if not isinstance(ad, MRIAdapter):
        raise ValueError(f"{run_dir} holds a {ad.name} encoder, not an MRI one")
    if ad.norm_pix:
        raise ValueError(f"{run_dir} was trained with adapter.norm_pix=true: its predictions lack each patch's "
                         f"mean and scale, so no volume can be synthesised; pretrain with norm_pix=false")
    item, geo = read_case(src_case_folder, ad.contrasts, side=ad.volume_size, return_geometry=True)
    present = torch.from_numpy(item["mri_present"])
    M = ad.num_contrasts
    if contrasts is None:
        want = ~present
    else:
        want = torch.zeros(M, dtype=torch.bool)
        for c in contrasts:
            want[ad.contrast_index(c)] = True
    visible = present & ~want
    result: dict[str, Any] = {"case": str(src_case_folder), "present": [c for c, p in zip(ad.contrasts, present) if p],
                              "synthesised": [c for c, w in zip(ad.contrasts, want) if w], "written": {}, "mse": {},
                              "grid": ad.volume_size}
    if not bool(want.any()):
        return result  # a complete case: nothing to synthesise
    if not bool(visible.any()):
        raise ValueError(f"{src_case_folder}: no contrast left for the model to read "
                         f"(present: {result['present']}, to synthesise: {result['synthesised']})")
    vol = torch.from_numpy(item["mri"]).to(device)
    # Every slot is tokenised (absent ones hold zeros) so the hidden contrasts have positions to predict;
    # hiding them drops them before the encoder, which therefore reads the visible contrasts only.
    batch = {"mri": vol[None], "mri_present": torch.ones(1, M, dtype=torch.bool, device=device)}
    tokens = ad.tokenize(batch)
    hidden = ~visible.to(device)[tokens.index[..., 0]]  # [1, N]
    out = enc.encode(tokens, hidden, "drop")
    pred = obj.decoder_pred(obj.decode(tokens, out)).float()  # [1, N, p^3]
    grid = tuple(n // ad.patch_size for n in vol.shape[1:])
    head = torch.from_numpy(item["mri"][present.numpy()] != 0).any(0).to(device) if bool(present.any()) else None
    out_dir = Path(out_dir)
    for m in torch.nonzero(want).flatten().tolist():
        name = ad.contrasts[m]
        sel = tokens.index[0, :, 0] == m
        cube = unpatchify3d(pred[0, sel], grid, ad.patch_size)  # tokens of a slot come in grid order
        if head is not None:
            cube = torch.where(head, cube, 0.0)
        if present[m]:
            real = vol[m]
            result["mse"][name] = float(((cube - real)[head] ** 2).mean()) if head is not None else float("nan")
        native = from_grid(cube.cpu().numpy(), geo)
        path = write_nifti(native, out_dir / f"{name}.nii.gz", geo.affine)
        result["written"][name] = str(path)
    return result


def reconstruct_command(args: list[str]) -> int:
    """``mmssl reconstruct modality=mri encoder=RUN src=CASE out=DIR [contrasts=flair,t2] [device=cpu]
    [checkpoint=last]``: the command-line form of ``reconstruct``."""
    kv: dict[str, str] = {}
    for a in args:
        k, eq, v = a.partition("=")
        if not eq:
            raise ValueError(f"reconstruct takes key=value arguments, not {a!r}")
        kv[k] = v
    unknown = set(kv) - {"modality", "encoder", "src", "out", "contrasts", "device", "checkpoint"}
    if unknown:
        raise ValueError(f"unknown reconstruct arguments {sorted(unknown)}")
    if kv.get("modality", "mri") != "mri":
        raise ValueError(f"reconstruct synthesises MRI contrasts; modality={kv['modality']} has no reconstruction")
    for k in ("encoder", "src", "out"):
        if not kv.get(k):
            raise ValueError(f"reconstruct needs {k}=... (encoder=RUN src=CASE_FOLDER out=DIR)")
    names = [c for c in kv.get("contrasts", "").split(",") if c] or None
    r = reconstruct(kv["encoder"], kv["src"], kv["out"], device=kv.get("device", "cpu"), contrasts=names,
                    checkpoint=kv.get("checkpoint", "last"))
    if not r["written"]:
        print(f"{r['case']}: every contrast is present ({', '.join(r['present'])}); nothing to synthesise")
    for name, path in r["written"].items():
        mse = r["mse"].get(name)
        extra = f" (MSE against the real one {mse:.3f}, z-score units)" if mse is not None else ""
        print(f"synthesised {name} from {', '.join(c for c in r['present'] if c not in r['synthesised'])} -> {path}{extra}")
    return 0


__all__ = ["reconstruct", "reconstruct_command"]
