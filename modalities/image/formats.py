"""The image formats this machine's Pillow reads, as file suffixes.

Pillow registers a suffix for every plug-in, including some that cannot decode pixels here: stubs
that wait for an application handler (BUFR, GRIB, HDF5, WMF/EMF off Windows), MPEG (the header only)
and EPS without Ghostscript. Those are left out, so such files count as ``unsupported_type`` rather
than as ``unreadable`` images."""
from __future__ import annotations

from PIL import EpsImagePlugin, Image, ImageFile

#: plug-ins that identify a file but never decode its pixels
HEADER_ONLY = frozenset({"MPEG"})


def _decodes(fmt: str) -> bool:
    factory = Image.OPEN.get(fmt, (None,))[0]
    if factory is None or fmt in HEADER_ONLY:
        return False
    if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
        return False
    return fmt != "EPS" or bool(EpsImagePlugin.has_ghostscript())


def image_suffixes() -> tuple[str, ...]:
    """Lower-case suffixes of the formats Pillow decodes here, sorted."""
    return tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items() if _decodes(fmt)))
