"""Generate `mnv1_backbone/data/coco_label_map.txt`: the 90-id COCO label map of the TF OD-API's COCO models.

Run once, offline, by a maintainer (not at install or test time):

    python tools/make_coco_label_map.py

The OD-API's COCO models (``mscoco_label_map.pbtxt``) use the COCO 2014/2017 category ids 1..90, of which 80 are
used; the ten ids COCO skipped (12, 26, 29, 30, 45, 66, 68, 69, 71, 83) have no class. The names are COCO's
category names, taken from torchvision's copy of the COCO category list (``torchvision.models._meta``, index = id,
"N/A" in the gaps). Output: one ``<id>\\t<name>`` line per used id. The script checks the count and a few ids.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.models._meta import _COCO_CATEGORIES

KNOWN = {1: "person", 3: "car", 17: "cat", 18: "dog", 47: "cup", 62: "chair", 90: "toothbrush"}
UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def main() -> None:
    pairs = [(i, name) for i, name in enumerate(_COCO_CATEGORIES) if i > 0 and name != "N/A"]
    if len(pairs) != 80 or {i for i in range(1, 91)} - {i for i, _ in pairs} != UNUSED_IDS:
        raise SystemExit("unexpected COCO category list")
    for i, name in KNOWN.items():
        if dict(pairs)[i] != name:
            raise SystemExit(f"id {i}: expected {name!r}, got {dict(pairs)[i]!r}")
    out = Path(__file__).resolve().parents[1] / "mnv1_backbone" / "data" / "coco_label_map.txt"
    out.write_text("".join(f"{i}\t{name}\n" for i, name in pairs), encoding="utf-8")


if __name__ == "__main__":
    main()
