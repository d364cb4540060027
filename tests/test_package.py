"""Package hygiene: import cost, public API, typing marker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mnv1_backbone


def test_import_does_not_pull_heavy_optional_packages() -> None:
    code = (
        "import sys, mnv1_backbone, mnv1_backbone.detection, mnv1_backbone.inference; "
        "print(sorted(m for m in ('transformers', 'timm', 'pycocotools', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_exported() -> None:
    for name in mnv1_backbone.__all__:
        assert hasattr(mnv1_backbone, name), name


def test_ships_py_typed_and_labels() -> None:
    package = Path(mnv1_backbone.__file__).parent
    assert (package / "py.typed").is_file()
    assert len((package / "data" / "imagenet_labels.txt").read_text().splitlines()) == 1001
