#!/usr/bin/env python
"""Generate ``src/sphere_ar_hf/data/imagenet_labels.json`` from timm's ImageNet data files.

The 1000 ImageNet-1k class names (in standard synset order, each with its comma-separated
synonyms) are taken from the data files that the ``timm`` package ships
(``timm/data/_info/imagenet_synsets.txt`` and ``imagenet_synset_to_lemma.txt``).
timm is only needed to regenerate the file, never at run time::

    pip download --no-deps timm -d /tmp/timm_whl
    python scripts/make_imagenet_labels.py /tmp/timm_whl/timm-*.whl

SOURCE may be the timm wheel (.whl), or a folder that contains the two text files anywhere below it
(an unpacked wheel, a timm source checkout, or the ``_info`` folder itself).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import zipfile
from pathlib import Path

SYNSETS_FILE = "imagenet_synsets.txt"
LEMMA_FILE = "imagenet_synset_to_lemma.txt"
NUM_CLASSES = 1000
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "sphere_ar_hf" / "data" / "imagenet_labels.json"


def _read_from_wheel(wheel: Path) -> tuple[str, str]:
    """Return the text of the synset and lemma files inside a timm wheel."""
    with zipfile.ZipFile(wheel) as zf:
        texts = {}
        for fname in (SYNSETS_FILE, LEMMA_FILE):
            members = [n for n in zf.namelist() if n.endswith("/_info/" + fname)]
            if len(members) != 1:
                raise SystemExit(f"{wheel}: expected exactly one '*/_info/{fname}', found {members}")
            texts[fname] = zf.read(members[0]).decode("utf-8")
    return texts[SYNSETS_FILE], texts[LEMMA_FILE]


def _read_from_dir(folder: Path) -> tuple[str, str]:
    """Return the text of the synset and lemma files found below ``folder``."""
    texts = {}
    for fname in (SYNSETS_FILE, LEMMA_FILE):
        hits = sorted(folder.rglob(fname))
        if not hits:
            raise SystemExit(f"{folder}: no {fname} found below this folder")
        if len(hits) > 1:
            raise SystemExit(f"{folder}: several {fname} found below this folder: {[str(h) for h in hits]}")
        texts[fname] = hits[0].read_text(encoding="utf-8")
    return texts[SYNSETS_FILE], texts[LEMMA_FILE]


def build_labels(synsets_text: str, lemma_text: str) -> list[str]:
    """Map the 1000 synset ids (in file order) to their comma-separated lemma strings."""
    synsets = [line.strip() for line in synsets_text.splitlines() if line.strip()]
    lemmas: dict[str, str] = {}
    for line in lemma_text.splitlines():
        if not line.strip():
            continue
        wnid, sep, lemma = line.partition("\t")
        if not sep:
            raise SystemExit(f"malformed lemma line (no tab): {line!r}")
        lemmas[wnid.strip()] = lemma.strip()
    missing = [s for s in synsets if s not in lemmas]
    if missing:
        raise SystemExit(f"{len(missing)} synsets have no lemma, e.g. {missing[:5]}")
    labels = [lemmas[s] for s in synsets]

    # Sanity checks against the well-known ImageNet-1k ordering.
    checks = [
        (len(synsets) == NUM_CLASSES, f"expected {NUM_CLASSES} synsets, got {len(synsets)}"),
        (len(set(synsets)) == len(synsets), "duplicate synset ids"),
        (synsets[0] == "n01440764" and synsets[-1] == "n15075141", "unexpected first/last synset id"),
        (labels[0].startswith("tench"), f"entry 0 is {labels[0]!r}, expected 'tench, ...'"),
        (labels[207] == "golden retriever", f"entry 207 is {labels[207]!r}, expected 'golden retriever'"),
        (labels[360] == "otter", f"entry 360 is {labels[360]!r}, expected 'otter'"),
        (all(labels), "empty label"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"sanity check failed: {msg}")
    return labels


def write_json_atomic(labels: list[str], out: Path) -> None:
    """Write ``labels`` as a JSON list to ``out`` via a temp file in the same folder and ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(labels, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="timm wheel (.whl) or a folder containing the timm data files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSON (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    src: Path = args.source
    if src.is_dir():
        synsets_text, lemma_text = _read_from_dir(src)
    elif src.is_file() and zipfile.is_zipfile(src):
        synsets_text, lemma_text = _read_from_wheel(src)
    else:
        raise SystemExit(f"{src}: not a folder or a wheel/zip file")

    labels = build_labels(synsets_text, lemma_text)
    write_json_atomic(labels, args.out)
    print(f"wrote {len(labels)} labels to {args.out}")


if __name__ == "__main__":
    main()
