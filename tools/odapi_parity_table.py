"""Print the TF-vs-ours table of docs/tf_object_detection.md from the OD-API fixtures (tests/fixtures/odapi/).

    python tools/odapi_parity_table.py

For every fixture case (TensorFlow's own numbers, written by tools/make_odapi_fixtures.py) it loads the model with
`from_tf_object_detection` and reports, over the two photos, the largest absolute differences of the anchors, the
preprocessed input, the raw box encodings and class logits (ours run on TF's preprocessed input), and of the final
detections (boxes in input pixels, scores), with the detection count and whether the labels agree.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from mnv1_backbone.detection.odapi import from_tf_object_detection

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "ssd_k1_sigmoid": {},
    "ssd_k3_legacy_explicit_depthwise_softmax": {"legacy_anchor_order": True, "clip_before_nms": True},
    "fpn_shared": {},
    "ssd_quantized": {},
}


def row(case: str, kwargs: dict) -> str:
    folder = ROOT / "tests" / "fixtures" / "odapi" / case
    ref = np.load(folder / "reference.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_tf_object_detection(folder, **kwargs)
    d_anchor = (model.anchors - torch.from_numpy(ref["anchors"])).abs().max().item()
    d_pre = d_codes = d_logits = d_boxes = d_scores = 0.0
    count, same_labels = 0, True
    for i in range(2):
        image = torch.from_numpy(ref[f"image_{i}"]).permute(2, 0, 1).float() / 255.0
        height, width = image.shape[-2:]
        with torch.no_grad():
            pre = model.preprocess([image])
            codes, logits, _ = model.network(torch.from_numpy(ref[f"preprocessed_{i}"]).permute(0, 3, 1, 2))
            det = model([image])[0]
        d_pre = max(d_pre, (pre.permute(0, 2, 3, 1) - torch.from_numpy(ref[f"preprocessed_{i}"])).abs().max().item())
        d_codes = max(d_codes, (codes - torch.from_numpy(ref[f"box_encodings_{i}"])).abs().max().item())
        d_logits = max(d_logits, (logits - torch.from_numpy(ref[f"class_predictions_{i}"])).abs().max().item())
        n = int(ref[f"num_detections_{i}"][0])
        boxes = torch.from_numpy(ref[f"detection_boxes_{i}"][0, :n])[:, [1, 0, 3, 2]]
        boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
        labels = ref[f"detection_classes_{i}"][0, :n].astype(np.int64).tolist()
        same_labels &= det["labels"].tolist() == labels
        if len(det["scores"]) == n and n:
            d_boxes = max(d_boxes, (det["boxes"] - boxes).abs().max().item())
            d_scores = max(d_scores, (det["scores"] - torch.from_numpy(ref[f"detection_scores_{i}"][0, :n]))
                           .abs().max().item())
        count += n
    return (f"| `{case}` | {d_anchor:.1e} | {d_pre:.1e} | {d_codes:.1e} | {d_logits:.1e} | {count} | "
            f"{'yes' if same_labels else 'NO'} | {d_boxes:.1e} | {d_scores:.1e} |")


def matching(case: str, kwargs: dict) -> str:
    """How many of TF's detections (same label, box within 0.5 px) a load with `kwargs` reproduces."""
    folder = ROOT / "tests" / "fixtures" / "odapi" / case
    ref = np.load(folder / "reference.npz")
    model = from_tf_object_detection(folder, **kwargs)
    found = total = 0
    for i in range(2):
        image = torch.from_numpy(ref[f"image_{i}"]).permute(2, 0, 1).float() / 255.0
        height, width = image.shape[-2:]
        with torch.no_grad():
            det = model([image])[0]
        n = int(ref[f"num_detections_{i}"][0])
        boxes = torch.from_numpy(ref[f"detection_boxes_{i}"][0, :n])[:, [1, 0, 3, 2]]
        boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
        labels = ref[f"detection_classes_{i}"][0, :n].astype(np.int64)
        for box, label in zip(boxes, labels, strict=True):
            close = (det["boxes"] - box).abs().amax(dim=1) <= 0.5
            found += bool((close & (det["labels"] == int(label))).any())
        total += n
    options = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return f"| `{case}` | `{options}` | {found} of {total} |"


def main() -> None:
    print("| case | anchors | preprocessed input | box encodings | class logits | detections (2 photos) | "
          "same labels | boxes (px) | scores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, kwargs in CASES.items():
        print(row(case, kwargs))
    print()
    print("| case | loaded with | TF detections reproduced |")
    print("|---|---|---|")
    legacy = "ssd_k3_legacy_explicit_depthwise_softmax"
    for kwargs in ({"legacy_anchor_order": True, "clip_before_nms": True},
                   {"legacy_anchor_order": False, "clip_before_nms": True},
                   {"legacy_anchor_order": True, "clip_before_nms": False}):
        print(matching(legacy, kwargs))
    print(matching("ssd_k1_sigmoid", {"clip_before_nms": True}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
