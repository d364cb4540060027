"""Package hygiene: import cost, public API, typing marker."""

from __future__ import annotations

import ast
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


# --- import graph --------------------------------------------------------------------------------------------
# Layers, lowest first (CONTRIBUTING.md draws them): a module may import its own layer or lower ones, never a
# higher one, lazily (inside a function) or not. Readers and converters sit below the models: they return and take
# (config, state_dict), and the models' from_* methods are the only places that build a model from them.
LAYERS: dict[str, int] = {
    "mnv1_backbone._io": 0,
    "mnv1_backbone.errors": 0,
    "mnv1_backbone.labels": 0,
    "mnv1_backbone.pretrained": 0,
    "mnv1_backbone.config": 1,
    "mnv1_backbone.layers": 1,
    "mnv1_backbone.shapes": 1,
    "mnv1_backbone.image_processing": 1,
    "mnv1_backbone.hf_checkpoint": 2,
    "mnv1_backbone.convert": 2,  # and every module of the convert/ package
    "mnv1_backbone.weights": 2,
    "mnv1_backbone.backbone": 3,
    "mnv1_backbone.classification": 3,
    "mnv1_backbone.inference": 4,
    "mnv1_backbone.quantization": 4,
    "mnv1_backbone.detection": 4,  # and every module of the detection/ package
    "mnv1_backbone": 5,  # the package's __init__ re-exports the public API
    "mnv1_backbone.cli": 5,  # and every command module
    "mnv1_backbone.__main__": 5,
}


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (function bodies included), parsed with ast.

    `from X import y` counts X, and X.y when that is a module; the parent packages Python runs first are left
    out, as every module would otherwise depend on the package's __init__.
    """
    modules = package_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                imported.add(target)
                imported.update(f"{target}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or (module.startswith(prefix + ".") and prefix != "mnv1_backbone"):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_package.py and CONTRIBUTING.md")


PACKAGE_ROOT = Path(mnv1_backbone.__file__).parent


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE_ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_never_go_up_a_layer() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(import_graph(PACKAGE_ROOT).items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_readers_and_converters_never_build_a_model() -> None:
    graph = import_graph(PACKAGE_ROOT)
    readers = [m for m in graph if layer_of(m) == LAYERS["mnv1_backbone.weights"]]
    assert {"mnv1_backbone.weights", "mnv1_backbone.convert.archive", "mnv1_backbone.hf_checkpoint"} <= set(readers)
    for module in readers:
        assert not graph[module] & {"mnv1_backbone.backbone", "mnv1_backbone.classification"}, module


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def late():\n    from ..a import thing\n    return thing\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("import pkg.sub\n")
    assert find_cycle(import_graph(package)) is None
