"""The seams the code is built around, checked on the source so a change that crosses one
fails here instead of in a review (docs/architecture.md, "One owner per boundary"):

- the inference service never imports TensorFlow, Keras or tf2onnx (its image has none);
- only registry/ talks to MLflow;
- the core (leukofed/) and the registry know no service;
- the round protocol's paths carry typed structures, not ``dict[str, Any]``;
- the default input size is defined once.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("leukofed", "services", "registry")

# Where a round's configuration and answers travel: what the aggregator sends, what a
# hospital decodes and answers, how the answers are checked, folded and recorded.
ROUND_PROTOCOL_PATHS = (
    "leukofed/protocol.py", "leukofed/validation.py",
    "services/aggregator/dispatch.py", "services/aggregator/gather.py",
    "services/aggregator/rounds.py", "services/aggregator/update_fold.py",
    "services/aggregator/model_steps.py", "services/aggregator/secure_steps.py",
    "services/aggregator/privacy_step.py", "services/aggregator/run_records.py",
    "services/aggregator/deps.py",
    "services/client/hospital.py", "services/client/worker.py", "services/client/virtual.py",
)


def python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def importers(folders: tuple[str, ...], roots: tuple[str, ...]) -> list[str]:
    """Files under ``folders`` that import a module whose top-level package is in ``roots``."""
    return [str(p.relative_to(ROOT)) for p in python_files(*folders)
            if any(m.split(".")[0] in roots for m in imported_modules(p))]


def is_number(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, int | float)


def test_the_import_scanner_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from tensorflow import keras\n"
                   "    import mlflow.onnx\n    from . import sibling\n")
    assert imported_modules(src) == {"os", "tensorflow", "mlflow.onnx"}


def test_inference_service_imports_no_tensorflow() -> None:
    assert importers(("services/inference",), ("tensorflow", "keras", "tf2onnx")) == []


def test_only_the_registry_imports_mlflow() -> None:
    outside = importers(("leukofed", "services"), ("mlflow",))
    assert outside == [], f"MLflow is the registry's business (registry/): {outside}"
    assert importers(("registry",), ("mlflow",)), "the registry should be what talks to MLflow"


def test_core_and_registry_know_no_service() -> None:
    # The services register their CLI commands through entry points (pyproject.toml).
    assert importers(("leukofed", "registry"), ("services",)) == []


@pytest.mark.parametrize("relpath", ROUND_PROTOCOL_PATHS)
def test_round_protocol_paths_are_typed(relpath: str) -> None:
    text = (ROOT / relpath).read_text()
    assert "dict[str, Any]" not in text, (
        f"{relpath}: use the structures of leukofed/protocol.py on the round protocol")


def test_default_image_size_is_defined_once() -> None:
    definitions, literal_defaults = [], []
    for path in python_files(*PRODUCT):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if "DEFAULT_IMAGE_SIZE" in names and is_number(node.value):
                    definitions.append(str(path.relative_to(ROOT)))
                if "image_size" in names and is_number(node.value):  # a settings field
                    literal_defaults.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = ([None] * (len(node.args.args) - len(node.args.defaults))
                            + list(node.args.defaults) + list(node.args.kw_defaults))
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "image_size" and is_number(default):
                        literal_defaults.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert definitions == ["leukofed/protocol.py"]
    assert literal_defaults == [], "default to leukofed.protocol.DEFAULT_IMAGE_SIZE"
