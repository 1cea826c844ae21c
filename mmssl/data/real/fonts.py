"""Letters rendered from Debian's free fonts (``fonts-*`` packages, OFL/GPL/Apache/...): a
notMNIST-like set. Label = the capital letter A-Z; each package (a type family: its regular, bold and
italic faces) is a group, so no family is in both train and test.

Each face (at most ``FACES_PER_FAMILY`` per package, chosen with a fixed seed) draws every letter
black on white, centred by its ink box, at ``SIZE`` px; a letter the face lacks (it draws the same
ink as for a private-use code point, the face's .notdef box) is left out."""
from __future__ import annotations

import random
import string
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmssl.data.fetch import RealSet, register

FAMILIES = ("fonts-dejavu-core", "fonts-liberation", "fonts-freefont-ttf", "fonts-croscore",
            "fonts-crosextra-carlito", "fonts-crosextra-caladea", "fonts-ebgaramond", "fonts-linuxlibertine",
            "fonts-cantarell", "fonts-open-sans", "fonts-lato", "fonts-comic-neue", "fonts-noto-mono", "fonts-go",
            "fonts-inconsolata", "fonts-hack", "fonts-lobster", "fonts-cabin", "fonts-gfs-didot",
            "fonts-femkeklaver", "fonts-breip", "fonts-dancingscript", "fonts-sil-gentium", "fonts-beteckna",
            "fonts-mononoki", "fonts-oldstandard", "fonts-quattrocento", "fonts-yanone-kaffeesatz",
            "fonts-league-spartan", "fonts-humor-sans", "fonts-isabella", "fonts-jura", "fonts-kristi",
            "fonts-rufscript", "fonts-tuffy", "fonts-radisnoir", "fonts-okolaks", "fonts-staypuft",
            "fonts-dustin", "fonts-goudybookletter", "fonts-cardo", "fonts-ecolier-court", "fonts-blankenburg",
            "fonts-fantasque-sans")
FACES_PER_FAMILY = 4
SIZE = 48  # image side, px
NOTDEF = "\ue000"  # a private-use code point: what a face draws for a letter it lacks


def ink(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image | None:
    """``ch`` drawn black on white, centred by its ink box and scaled into the square; None when empty."""
    big = SIZE * 3
    im = Image.new("L", (big, big), 255)
    ImageDraw.Draw(im).text((SIZE // 2, SIZE // 2), ch, font=font, fill=0)
    box = Image.eval(im, lambda v: 255 - v).getbbox()
    if box is None:
        return None
    glyph = im.crop(box)
    scale = (SIZE - 8) / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    out = Image.new("L", (SIZE, SIZE), 255)
    out.paste(glyph, ((SIZE - glyph.width) // 2, (SIZE - glyph.height) // 2))
    return out


def faces(pkg_root: Path) -> list[Path]:
    """A package's .ttf/.otf faces (each once, links resolved inside the package), at most
    FACES_PER_FAMILY, chosen with a fixed seed."""
    inside = pkg_root.resolve()
    files = sorted({p.resolve() for p in (pkg_root / "usr/share/fonts").rglob("*")
                    if p.suffix.lower() in (".ttf", ".otf") and p.exists() and p.resolve().is_relative_to(inside)})
    random.Random(f"fonts-{pkg_root.name}").shuffle(files)
    return sorted(files[:FACES_PER_FAMILY])


def build(root: Path, tree: Path) -> None:
    for family in FAMILIES:
        for face in faces(root / family):
            font = ImageFont.truetype(str(face), size=SIZE)
            notdef = ink(font, NOTDEF)
            for ch in string.ascii_uppercase:
                im = ink(font, ch)
                if im is None or (notdef is not None and im.tobytes() == notdef.tobytes()):
                    continue
                f = tree / ch / family / f"{face.stem}.png"
                f.parent.mkdir(parents=True, exist_ok=True)
                im.save(f)


FONT_SET = register(RealSet(
    name="fonts", modality="image", packages=FAMILIES, build=build, group_level=2, num_shards=4,
    val=0.15, test=0.25, per_package_root=True,
    summary=f"capital letters A-Z rendered from {len(FAMILIES)} Debian font packages, split by family"))
