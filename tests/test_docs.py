"""The documentation site: every Python example in docs/*.md runs, the site builds, the figure script works.

Each page's ```python blocks run in order in one namespace, in a fresh working directory holding what the
examples expect: `tests/` (the photos), the Hugging Face directory `mobilenet_v1_1.0_224/` that the quick start
writes (from Google's real frozen graph), and a TF release `mobilenet_v1_0.25_128.tgz` with its extracted
checkpoint `mobilenet_v1_0.25_128.ckpt.*` (the converter's test fixture). A block preceded by
`<!-- skip-test: reason -->` is not run; keep those few and say why. README.md has its own test (test_readme.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mnv1_backbone import MobileNetV1ForImageClassification, MobileNetV1ImageProcessor
from mnv1_backbone.pretrained import find_bundled_frozen_graph

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TF_FIXTURES = ROOT / "tests" / "fixtures" / "tf_slim"
TF_RELEASE = "mobilenet_v1_0.25_128"
_BLOCK = re.compile(
    r"(?P<skip><!-- skip-test: (?P<reason>[^>]+?) -->[ \t]*\n)?```python[^\n]*\n(?P<code>.*?)```", re.DOTALL
)
# Modules some pages import that come with the `test` extra; a page is skipped, not failed, without them.
_OPTIONAL_MODULES = ("onnxruntime", "onnxscript", "transformers", "timm")


def python_blocks(text: str) -> list[tuple[str | None, str]]:
    """(skip reason or None, code) of every ```python block, in order."""
    return [(match["reason"], match["code"]) for match in _BLOCK.finditer(text)]


def test_block_extraction_convention() -> None:
    text = "x\n```python\na = 1\n```\n<!-- skip-test: needs the Hub -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(None, "a = 1\n"), ("needs the Hub", "b = 2\n")]


def test_few_examples_are_skipped_and_each_says_why() -> None:
    skipped = [(page.name, reason) for page in PAGES for reason, _ in python_blocks(page.read_text()) if reason]
    assert len(skipped) <= 3, skipped
    assert all(len(reason) > 8 for _, reason in skipped)
    runnable = sum(1 for page in PAGES for reason, _ in python_blocks(page.read_text()) if reason is None)
    assert runnable >= 25


def test_every_page_is_in_the_navigation_and_every_image_exists() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    navigation = set(re.findall(r"^  - [^:]+: (\S+\.md)$", config, flags=re.MULTILINE))
    assert navigation == {page.name for page in PAGES}
    for page in PAGES:
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (DOCS / image).is_file(), (page.name, image)


@pytest.fixture(scope="session")
def doc_files(tmp_path_factory) -> Path:
    """The files the examples use, made once: the HF directory and the TF release archive and checkpoint."""
    graph = find_bundled_frozen_graph()
    if graph is None:
        pytest.skip("the examples use Google's real weights: pip install --no-deps nudity==0.2.3")
    root = tmp_path_factory.mktemp("doc_files")
    MobileNetV1ForImageClassification.from_tf(graph).save_pretrained(root / "mobilenet_v1_1.0_224")
    MobileNetV1ImageProcessor().save_pretrained(root / "mobilenet_v1_1.0_224")
    checkpoint_files = sorted(TF_FIXTURES.glob(f"{TF_RELEASE}.ckpt.*"))
    if checkpoint_files:
        with tarfile.open(root / f"{TF_RELEASE}.tgz", "w:gz") as archive:
            for file in checkpoint_files:
                archive.add(file, arcname=f"./{file.name}")
        for file in checkpoint_files:
            (root / file.name).symlink_to(file)
    return root


def _pages_with_code() -> list[Path]:
    return [page for page in PAGES if any(reason is None for reason, _ in python_blocks(page.read_text()))]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # TorchScript is deprecated
@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda page: page.stem)
def test_page_examples_run(page: Path, doc_files: Path, tmp_path, monkeypatch) -> None:
    text = page.read_text()
    for module in _OPTIONAL_MODULES:
        if f"import {module}" in text and importlib.util.find_spec(module) is None:
            pytest.skip(f"{page.name} needs {module} (the test extra installs it)")
    if TF_RELEASE in text and not (doc_files / f"{TF_RELEASE}.tgz").exists():
        pytest.skip("the TF checkpoint fixture is missing")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    for file in doc_files.iterdir():
        if file.is_dir():
            shutil.copytree(file, tmp_path / file.name)  # examples may write into it
        else:
            (tmp_path / file.name).symlink_to(file.resolve())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, (reason, code) in enumerate(python_blocks(text), start=1):
        if reason is not None:
            continue
        try:
            exec(compile(code, f"{page}:block{number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name}, python block {number} failed: {error!r}\n{code}") from error


def test_mkdocs_build_is_strict_clean(tmp_path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra installs mkdocs")
    pytest.importorskip("mkdocstrings", reason="the docs extra installs mkdocstrings")
    pytest.importorskip("material", reason="the docs extra installs mkdocs-material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "MobileNetV1Backbone" in api and "ssdlite320_mobilenet_v1" in api


def test_feature_map_figure_script(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    if find_bundled_frozen_graph() is None:
        pytest.skip("the figure uses Google's real weights")
    spec = importlib.util.spec_from_file_location("make_feature_maps", DOCS / "make_feature_maps.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    drawn = script.draw(tmp_path / "maps.png")
    with Image.open(drawn) as new, Image.open(DOCS / "images" / "feature_maps.png") as committed:
        assert new.size == committed.size  # the committed picture is what the script draws
