"""KLettres' recordings (Debian ``klettres-data``, GPL-2+): letters and syllables spoken by one voice
per language, about 20 languages, Ogg Vorbis.

Two sets from the same package, both driven by each language's ``sounds.xml`` (what KLettres itself
plays: sound name -> file):

- ``klettres``: label = the letter spoken, A-Z, from the alphabet recordings of the Latin-alphabet
  languages (those whose alphabet names are mostly A-Z); the voice (the language folder a file sits in)
  is the group, so no voice is in both train and test. A content task: the same letter across voices
  and languages.
- ``klettres-language``: label = the voice (language), from every alphabet and syllable recording,
  at most ``PER_VOICE`` per voice so no voice dominates; split stratified by voice. A speaker task.
"""
from __future__ import annotations

import random
import string
import xml.etree.ElementTree as ET
from pathlib import Path

from mmssl.data.fetch import RealSet, link_or_copy, register

#: where the package installs its sounds (below the unpacked root)
SOUNDS = Path("usr/share/klettres")
LETTERS = set(string.ascii_uppercase)
#: recordings kept per voice in klettres-language (Malayalam alone ships 521 of 1,836)
PER_VOICE = 60


def sounds(root: Path) -> list[tuple[str, str, str, Path]]:
    """``(language code, section, sound name, file)`` for each sound a ``sounds.xml`` lists whose file
    the package ships (some languages' lists name files of another package); each file once."""
    base = root / SOUNDS
    out, seen = [], set()
    for xml in sorted(base.glob("*/sounds.xml")):
        for lang in ET.parse(xml).getroot().iter("language"):
            for section in ("alphabet", "syllables"):
                node = lang.find(section)
                for snd in node.iter("sound") if node is not None else ():
                    rel, name = snd.get("file") or "", snd.get("name") or ""
                    f = base / rel
                    if rel and f.is_file() and f not in seen:
                        seen.add(f)
                        out.append((lang.get("code") or xml.parent.name, section, name, f))
    return out


def voice_of(f: Path, root: Path) -> str:
    """The voice = the language folder the recording sits in (``<lang>/alpha/a-0.ogg``)."""
    return f.relative_to(root / SOUNDS).parts[0]


def latin_voices(items: list[tuple[str, str, str, Path]], root: Path) -> set[str]:
    """Voices whose alphabet names are mostly single letters A-Z."""
    alpha: dict[str, list[str]] = {}
    for _, section, name, f in items:
        if section == "alphabet":
            alpha.setdefault(voice_of(f, root), []).append(name)
    return {v for v, names in alpha.items() if sum(n.upper() in LETTERS for n in names) * 2 > len(names)}


def build_letters(root: Path, tree: Path) -> None:
    items = sounds(root)
    latin = latin_voices(items, root)
    for _, section, name, f in items:
        voice = voice_of(f, root)
        if section == "alphabet" and voice in latin and len(name) == 1 and name.upper() in LETTERS:
            link_or_copy(f, tree / name.upper() / voice / f.name)


def build_voices(root: Path, tree: Path) -> None:
    by_voice: dict[str, list[Path]] = {}
    for _, _, _, f in sounds(root):
        by_voice.setdefault(voice_of(f, root), []).append(f)
    for voice, files in sorted(by_voice.items()):
        files = sorted(files)
        random.Random(f"klettres-{voice}").shuffle(files)  # a fixed choice per voice
        for f in files[:PER_VOICE]:
            rel = f.relative_to(root / SOUNDS / voice)
            link_or_copy(f, tree / voice / "_".join(rel.parts))


KLETTRES = register(RealSet(
    name="klettres", modality="speech", packages=("klettres-data",), build=build_letters, group_level=2,
    val=0.15, test=0.25, num_shards=2, version=2,  # 230 train items: 2 shards hold a 64-item batch each
    summary="KLettres alphabet recordings, label = letter A-Z, Latin-alphabet voices, split by voice"))

KLETTRES_LANGUAGE = register(RealSet(
    name="klettres-language", modality="speech", packages=("klettres-data",), build=build_voices, num_shards=4,
    summary=f"KLettres letters and syllables, label = voice/language, at most {PER_VOICE} per voice"))
