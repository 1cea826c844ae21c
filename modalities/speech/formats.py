"""The audio containers this machine's soundfile (libsndfile) build reads, as file suffixes.

libsndfile names formats, not suffixes; the table below maps each major format to the suffixes its
files carry. A format the linked libsndfile lacks (MP3 before 1.1, Opus before 1.0.29) is left out,
so ``mmssl data pack`` counts such files as ``unsupported_type`` instead of failing on each one."""
from __future__ import annotations

import soundfile as sf

#: libsndfile major format -> the suffixes of its files (Ogg holds Vorbis or Opus; .oga is Ogg audio)
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "WAV": (".wav", ".wave"), "WAVEX": (".wav",), "RF64": (".rf64",), "W64": (".w64",),
    "FLAC": (".flac",), "OGG": (".ogg", ".oga", ".opus"), "MP3": (".mp3",),
    "AIFF": (".aif", ".aiff", ".aifc"), "AU": (".au", ".snd"), "CAF": (".caf",),
}


def audio_suffixes() -> tuple[str, ...]:
    """Lower-case suffixes of the containers soundfile reads here, in a fixed order."""
    have = sf.available_formats()
    out: list[str] = []
    for fmt, sufs in FORMAT_SUFFIXES.items():
        if fmt not in have:
            continue
        if fmt == "OGG":  # Ogg without the Opus codec (libsndfile < 1.0.29) reads no .opus file
            sufs = tuple(s for s in sufs if s != ".opus" or "OPUS" in sf.available_subtypes("OGG"))
        out += [s for s in sufs if s not in out]
    return tuple(out)
