"""Every Python example in README.md runs, so the docs cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mnv1_backbone.pretrained import find_bundled_frozen_graph

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_commands_match_ci() -> None:
    text = README.read_text()
    commands = re.findall(r"```bash\n(?:#.*\n)?(.*?)\n```", text)
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(find_bundled_frozen_graph() is None, reason="the examples use the real weights")
def test_readme_examples_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    namespace: dict = {}
    for block in _python_blocks(README.read_text()):  # later blocks use files earlier ones wrote
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "mobilenet_v1_1.0_224" / "config.json").is_file()
    assert set(namespace["detections"][0]) == {"boxes", "scores", "labels"}
