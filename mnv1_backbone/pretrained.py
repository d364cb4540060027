"""Where real MobileNetV1 weights can be found on this machine without a download.

Google's `mobilenet_v1_1.0_224` frozen graph ships inside the PyPI package `nudity==0.2.3`
(`nudity/files/retrained_graph.pb`; install it with `pip install --no-deps nudity==0.2.3`). The
package is located with `importlib.util.find_spec` and never imported: its import needs TensorFlow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["find_bundled_frozen_graph"]


def find_bundled_frozen_graph() -> Path | None:
    """Path of the real ImageNet frozen graph shipped by the `nudity` package, or None if not installed."""
    try:
        spec = importlib.util.find_spec("nudity")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "files" / "retrained_graph.pb"
        if candidate.is_file():
            return candidate
    return None
