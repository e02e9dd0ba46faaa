"""The tree is the architecture: what each layer may import, and how small the command line stays."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stream_service"
LAYERS = {"bridges", "cli", "model", "quality", "runtime", "sources", "stages", "training", "vision", "web", "wire"}
# client.py: the slim subscriber, ``stream_service.client`` (its import path is its interface).
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "settings.py", "errors.py", "client.py"}
# Pure kernels: arrays in, arrays out. No sockets, cameras, ONNX Runtime, processes or web.
VISION_BANNED = ("zmq", "onnxruntime", "stream_service.runtime", "stream_service.wire", "stream_service.web")
CLI_MAX_LINES = 60


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def imported(tree: ast.AST) -> list[str]:
    """Every module an AST imports, at the top or inside functions (lazy imports count too)."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def attributes(tree: ast.AST) -> list[str]:
    """Dotted attribute uses such as ``cv2.VideoCapture``."""
    return [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
    ]


def test_the_package_top_level_holds_only_the_layers_and_the_shared_modules() -> None:
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries - LAYERS - TOP_LEVEL_FILES == set()
    assert all((PACKAGE / layer / "__init__.py").is_file() for layer in LAYERS)


def test_the_slim_client_imports_nothing_of_the_pipeline_but_its_errors() -> None:
    tree = ast.parse((PACKAGE / "client.py").read_text(encoding="utf-8"))
    ours = {n.split(".")[1] for n in imported(tree) if n.startswith("stream_service.")}
    assert ours == {"errors"}, ours  # messages, transport or settings would bring NumPy along


@pytest.mark.parametrize("path", modules("vision"), ids=lambda p: p.name)
def test_vision_modules_do_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = [n for n in imported(tree) if any(n == b or n.startswith(b + ".") for b in VISION_BANNED)]
    bad += [a for a in attributes(tree) if a == "cv2.VideoCapture"]
    assert bad == [], f"{path.name} imports {bad}"


def test_the_layout_check_catches_a_forbidden_import() -> None:
    tree = ast.parse("def f():\n    from stream_service.wire.transport import FrameSender\n    cv2.VideoCapture(0)\n")
    assert "stream_service.wire.transport" in imported(tree) and "cv2.VideoCapture" in attributes(tree)


@pytest.mark.parametrize("path", modules("cli"), ids=lambda p: p.name)
def test_command_line_functions_stay_short(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > CLI_MAX_LINES
    }
    assert long == {}, f"functions over {CLI_MAX_LINES} lines in cli/{path.name}: {long}"


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_the_infer_stage_does_not_load_numba() -> None:
    loaded = loaded_after("import stream_service.stages.inference")
    assert "stream_service" in loaded
    assert "numba" not in loaded and "llvmlite" not in loaded


def test_the_command_line_starts_without_heavy_imports() -> None:
    loaded = loaded_after("import stream_service.cli")
    assert not loaded & {"numba", "onnxruntime", "torch", "cupy", "zmq"}
