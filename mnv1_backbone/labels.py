"""ImageNet class names for Google's 1001-way MobileNet checkpoints.

The labels live in `mnv1_backbone/data/imagenet_labels.txt` (generated once by `tools/make_imagenet_labels.py`
from the synset lemmas timm ships): line 0 is "background", line j + 1 is ImageNet-1k class j, with the same
strings as the `id2label` of Hugging Face's MobileNetV1 configs (e.g. 282 "tabby, tabby cat", 968 "espresso").
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["NUM_CHECKPOINT_LABELS", "imagenet_id2label", "imagenet_labels"]

NUM_CHECKPOINT_LABELS = 1001
_LABELS_FILE = "imagenet_labels.txt"


@lru_cache(maxsize=1)
def _load_labels() -> tuple[str, ...]:
    text = (resources.files("mnv1_backbone") / "data" / _LABELS_FILE).read_text(encoding="utf-8")
    labels = tuple(text.splitlines())
    if len(labels) != NUM_CHECKPOINT_LABELS or labels[0] != "background":
        raise RuntimeError(
            f"mnv1_backbone/data/{_LABELS_FILE} is damaged: expected {NUM_CHECKPOINT_LABELS} lines starting with "
            f"'background', got {len(labels)} lines starting with {labels[:1]!r}; reinstall the package"
        )
    return labels


def imagenet_labels() -> list[str]:
    """Return the 1001 checkpoint labels: index 0 "background", index j + 1 ImageNet-1k class j.

    The file is read once and cached; each call returns a fresh list, so callers may modify it.
    """
    return list(_load_labels())


def imagenet_id2label() -> dict[int, str]:
    """Return `{index: label}` for the 1001 checkpoint labels, as in Hugging Face's MobileNetV1 `id2label`."""
    return dict(enumerate(_load_labels()))
