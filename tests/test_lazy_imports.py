"""The ``prunepilot`` command starts without the engine's heavy imports, and the engine package's
lazily loaded names are the functions and classes it exports (compression/__init__.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import prunepilot.compression as compression
from prunepilot.compression import finalizing, finetuning

HEAVY = ("torch", "torchvision", "timm", "torch_pruning", "onnx", "onnxruntime", "ray", "sqlalchemy")


def test_the_cli_module_imports_none_of_the_engine() -> None:
    """`prunepilot status`, `submit`, `keys` or `--help` pay for the CLI module's imports only (a fresh
    interpreter: this one has torch loaded already)."""
    code = ("import json, sys; import prunepilot.service.cli; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


def test_every_exported_name_loads_and_is_what_its_submodule_defines() -> None:
    assert set(compression.__all__) == set(compression._EXPORTS)
    assert set(compression.__all__) <= set(dir(compression))
    for name in compression.__all__:
        value = getattr(compression, name)
        assert not isinstance(value, types.ModuleType), name
        module = sys.modules[f"prunepilot.compression{compression._EXPORTS[name]}"]
        assert value is getattr(module, name), name
    # the function, also once its submodule is loaded (a submodule of the same name would replace it)
    assert compression.finetune is finetuning.finetune
    assert compression.finalize is finalizing.finalize


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        compression.no_such_name  # noqa: B018
