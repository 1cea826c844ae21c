"""Image data: files read with PIL into RGB uint8, PNG (or the source JPEG) in shards, square batches
(shorter side resized, then a random or centre crop); the embedded presets ``image-synth`` (default)
and ``digits`` (scikit-learn's handwritten digits)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from mmssl.data.pool import pooled
from mmssl.data.shards import BadSample, build_atomically, write_split
from mmssl.modalities.image.formats import image_suffixes
from mmssl.registry import PRESETS
from mmssl.types import Batch

#: webdataset fields an image may be stored under (what ``mmssl data pack`` writes: png, or jpg as read)
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
#: colour stands behind transparent pixels (what an image viewer on a white page shows)
MATTE = 255.0


def to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [3, H, W].

    Orientation from EXIF is applied (what a viewer shows). Transparency (RGBA, LA, palette with a
    transparent entry) is composited over white. 16-bit greyscale (``I;16*``) is scaled from 0-65535
    (PIL's own conversion would saturate it); 32-bit integer greyscale (``I``) likewise when a value
    exceeds 255, else it is read as 0-255; float greyscale (``F``) is read as 0-1 when its maximum is at
    most 1, else as 0-255. Other modes (1, L, P, CMYK, YCbCr, LAB, HSV, ...) go through PIL's
    conversion."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block: the pixels are still good, shown as stored
        pass
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        else:  # I;16, I;16B; and I, as PIL opens some 16-bit files (e.g. TIFF)
            a = a / 257.0 if im.mode != "I" or (a.size and a.max() > 255) else a
        g = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return np.repeat(g[None], 3, 0)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + MATTE * (1.0 - alpha)
        return np.ascontiguousarray(rgb.round().astype(np.uint8).transpose(2, 0, 1))
    return np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1))


def _read(source: Any, name: str) -> tuple[np.ndarray, str]:
    """An image file (path or file object) -> (uint8 [3, H, W], PIL format name); raises BadSample."""
    try:
        with Image.open(source) as im:
            im.load()  # decode now: truncated or corrupt data fails here, not later
            fmt = im.format or ""
            rgb = to_rgb(im)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError, ...
        raise BadSample(f"unreadable: {name}: {type(e).__name__}: {e}") from None
    if rgb.shape[1] == 0 or rgb.shape[2] == 0:
        raise BadSample(f"empty: {name}: image of size {rgb.shape[2]}x{rgb.shape[1]}")
    return rgb, fmt


def square_crop(img: torch.Tensor, side: int, generator: torch.Generator | None) -> torch.Tensor:
    """[3, H, W] -> [3, side, side]: the shorter side resized to ``side`` (bilinear, antialiased), then a
    random crop drawn with ``generator`` or, when it is None, the centre crop."""
    H, W = img.shape[-2:]
    if (H, W) == (side, side):
        return img
    if min(H, W) != side:
        img = TF.resize(img, [side], antialias=True)  # an int-like size: the shorter side
        H, W = img.shape[-2:]
    if generator is None:
        return TF.center_crop(img, [side, side])
    top = int(torch.randint(H - side + 1, (1,), generator=generator))
    left = int(torch.randint(W - side + 1, (1,), generator=generator))
    return img[:, top:top + side, left:left + side]


class ImageCodec:
    """Items hold ``image``: uint8 [3, H, W] (numpy from ``read_file``, a tensor from ``decode``).
    Batches hold ``image``: float32 [B, 3, S, S] in [0, 1]."""

    modality = "image"
    suffixes = image_suffixes()  # every format Pillow decodes here (png, jpeg, webp, tiff, bmp, gif, ...)

    def read_file(self, path: str) -> dict[str, Any]:
        name = Path(path).name
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BadSample(f"unreadable: {name}: {e}") from None
        if not data:
            raise BadSample(f"empty: {name}: zero-byte file")
        rgb, fmt = _read(io.BytesIO(data), name)
        item: dict[str, Any] = {"image": rgb}
        if fmt == "JPEG":  # keep the original bytes: re-encoding as PNG would be several times larger
            item["jpg"] = data
        return item

    def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        if item.get("jpg") is not None:
            return {"jpg": item["jpg"]}
        buf = io.BytesIO()
        hwc = np.ascontiguousarray(np.asarray(item["image"], dtype=np.uint8).transpose(1, 2, 0))
        Image.fromarray(hwc).save(buf, format="PNG", compress_level=6)
        return {"png": buf.getvalue()}

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        field = next((f for f in IMAGE_FIELDS if f in raw), None)
        if field is None:
            raise BadSample(f"missing_field: {key}: no image field (one of {', '.join(IMAGE_FIELDS)})")
        rgb, _ = _read(io.BytesIO(raw[field]), str(key))
        return {"image": torch.from_numpy(rgb)}

    def length(self, item: dict[str, Any]) -> int:
        """The shorter side: batches of similar shorter sides need the least resizing."""
        return int(min(item["image"].shape[-2:]))

    def collate(self, items: list[dict[str, Any]], max_len: int | None, generator: torch.Generator | None,
                keep_frame_labels: bool = True) -> Batch:
        """Square images of side ``max_len`` (default: the smallest side among the items): random
        crops with ``generator`` (training), centre crops without (evaluation)."""
        side = int(max_len) if max_len is not None else min(self.length(it) for it in items)
        if side < 1:
            raise ValueError(f"image side must be positive, not {side}")
        imgs = [square_crop(torch.as_tensor(it["image"]), side, generator) for it in items]
        return {"image": torch.stack(imgs).float().div_(255.0)}


def _sample(codec: ImageCodec, i: int, pixels: np.ndarray, label: int) -> dict[str, Any]:
    """uint8 [3, H, W] -> a shard sample."""
    s = codec.encode({"image": pixels})
    s.update({"__key__": f"{i:08d}", "cls": str(int(label)).encode(), "sid": str(i).encode()})
    return s


@PRESETS.register("image-synth")
class ImageSynthPreset:
    """Synthetic coloured shapes in clutter, 32x32, 10 shape classes (modalities/image/synth.py).
    Generated on first use; the generator version is frozen once shipped."""

    modality = "image"
    version = 1

    def build(self, out: Path, seed: int = 0) -> None:
        from mmssl.modalities.image import synth

        codec = ImageCodec()
        meta: dict[str, Any] = {"name": "image-synth", "modality": "image",
                                "generator_version": synth.GENERATOR_VERSION, "seed": seed,
                                "classes": list(synth.CLASSES), "image_size": synth.SIZE, "splits": {},
                                "bad_samples": {}}
        for split, n in synth.SPLITS.items():
            def samples(split: str = split, n: int = n) -> Any:
                for i, (s, label) in enumerate(pooled(
                        synth.generate, split, n, seed=seed,
                        then=lambda im: (codec.encode({"image": im.pixels.transpose(2, 0, 1)}), im.label))):
                    s.update({"__key__": f"{i:08d}", "cls": str(int(label)).encode(), "sid": str(i).encode()})
                    yield s

            shards = write_split(samples(), out / split, num_shards=8 if split == "train" else 2)
            meta["splits"][split] = {"shards": shards, "count": n}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"image-synth-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))


@PRESETS.register("digits")
class DigitsPreset:
    """scikit-learn's handwritten digits (``load_digits``: 1,797 8x8 greyscale images, values 0-16,
    shipped inside scikit-learn), scaled to 0-255, upsampled once to 32x32 (bilinear, antialiased: the
    micro model's image size) and stored as RGB. Stratified splits train 1,000 / val 197 / test 600:
    the whole set is too small for a 1,000-item test split beside a useful train split."""

    modality = "image"
    version = 1
    SIZE = 32
    SPLITS: ClassVar[dict[str, int]] = {"train": 1000, "val": 197, "test": 600}

    def splits(self, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """Stratified index sets of exactly ``SPLITS`` sizes."""
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(labels))
        rest, test = train_test_split(idx, test_size=self.SPLITS["test"], stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=self.SPLITS["val"], stratify=labels[rest],
                                      random_state=seed)
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def images(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (uint8 [n, 3, SIZE, SIZE], labels [n])."""
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # [n, 1, 8, 8]
        x = TF.resize(x, [self.SIZE, self.SIZE], antialias=True).expand(-1, 3, -1, -1)
        return x.numpy(), d.target.astype(np.int64)

    def build(self, out: Path, seed: int = 0) -> None:
        x, y = self.images()
        codec = ImageCodec()
        meta: dict[str, Any] = {
            "name": "digits", "modality": "image", "generator_version": self.version, "seed": seed,
            "classes": [str(c) for c in range(10)], "image_size": self.SIZE, "splits": {}, "bad_samples": {},
            "source": "sklearn.datasets.load_digits (1,797 8x8 images, 0-16; upsampled to 32x32)",
            "note": "stratified train 1000 / val 197 / test 600: the set has only 1,797 images"}
        for split, idx in self.splits(y, seed).items():
            samples = (_sample(codec, i, x[j], y[j]) for i, j in enumerate(idx.tolist()))
            shards = write_split(samples, out / split, num_shards=8 if split == "train" else 2)
            meta["splits"][split] = {"shards": shards, "count": len(idx)}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))

    def ensure(self, cache_dir: Path, seed: int = 0) -> Path:
        root = Path(cache_dir) / "data" / f"digits-v{self.version}-seed{seed}"
        return build_atomically(root, lambda tmp: self.build(tmp, seed))
