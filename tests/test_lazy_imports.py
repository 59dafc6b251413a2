"""The ``prunepilot`` command starts without the engine's heavy imports where a command needs none of
them, and the engine package's lazily loaded names are the functions and classes it exports
(compression/__init__.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import prunepilot.compression as compression
from prunepilot.compression import finalizing, finetuning

HEAVY = ("torch", "torchvision", "timm", "torch_pruning", "onnx", "onnxruntime", "ray", "sqlalchemy")


def _heavy_after_import(module: str) -> list[str]:
    """The heavy modules importing ``module`` loads, in a fresh interpreter (this one has torch)."""
    code = f"import json, sys; import {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module, allowed", [
    ("prunepilot.service.cli", ()),  # every command pays for these: `--help`, `status`, `submit`
    ("prunepilot.service.auth", ("sqlalchemy",)),  # `keys create` / `keys list`
    ("prunepilot.service.db.migrate", ("sqlalchemy",)),  # `db upgrade` / `current`
    ("prunepilot.compression.problem", ()),  # `submit` parses its budget
])
def test_commands_that_need_no_engine_import_none_of_it(module: str, allowed: tuple[str, ...]) -> None:
    assert [m for m in _heavy_after_import(module) if m not in allowed] == []


def test_the_lists_of_exports_agree() -> None:
    """The TYPE_CHECKING imports (what type checkers see), ``_EXPORTS`` (what loads at run time) and ``__all__``."""
    tree = ast.parse(Path(compression.__file__).read_text(encoding="utf-8"))
    guard = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {alias.name: node.module for node in guard.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imported == compression._EXPORTS
    assert sorted(compression.__all__) == sorted(compression._EXPORTS)


def test_every_exported_name_loads_and_is_what_its_submodule_defines() -> None:
    assert set(compression.__all__) <= set(dir(compression))
    for name in compression.__all__:
        value = getattr(compression, name)
        assert not isinstance(value, types.ModuleType), name
        module = sys.modules[f"prunepilot.compression.{compression._EXPORTS[name]}"]
        assert value is getattr(module, name), name
    # the function, also once its submodule is loaded (a submodule of the same name would replace it)
    assert compression.finetune is finetuning.finetune
    assert compression.finalize is finalizing.finalize


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        compression.no_such_name  # noqa: B018
