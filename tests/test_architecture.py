"""The import direction of the layers is part of the design: service > agents > envs > compression.

Checked on the source with ``ast`` (import-linter cannot see our folder-to-package mapping in an
editable install): every ``prunepilot.<layer>`` import must point to the same or a lower layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"compression": 0, "envs": 1, "agents": 2, "service": 3}
THIRD_PARTY_BANNED = {"compression": {"sqlalchemy", "fastapi", "ray", "alembic", "optuna", "stable_baselines3", "gymnasium"}}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def violations() -> list[str]:
    bad = []
    for layer, rank in LAYERS.items():
        for path in (ROOT / layer).rglob("*.py"):
            for mod in imports_of(path):
                parts = mod.split(".")
                if parts[0] == "prunepilot" and len(parts) > 1 and parts[1] in LAYERS and LAYERS[parts[1]] > rank:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
                if parts[0] in THIRD_PARTY_BANNED.get(layer, set()):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod} (not allowed in the engine)")
                if parts[0] in LAYERS:
                    bad.append(f"{path.relative_to(ROOT)} imports top-level {mod}; use prunepilot.{mod}")
    return bad


def test_layers_import_downwards_only() -> None:
    assert violations() == []


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from prunepilot.service.settings import Settings\nimport prunepilot.agents\n")
    mods = imports_of(f)
    assert mods == ["prunepilot.service.settings", "prunepilot.agents"]
    assert all(LAYERS[m.split(".")[1]] > LAYERS["compression"] for m in mods)


def test_every_package_folder_is_installed() -> None:
    """pyproject lists packages explicitly (folders map into the prunepilot namespace)."""
    text = (ROOT / "pyproject.toml").read_text()
    for layer in (*LAYERS, "alembic"):
        for init in (ROOT / layer).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            name = ".".join(("prunepilot", "migrations" if rel[0] == "alembic" else rel[0], *rel[1:]))
            assert f'"{name}"' in text, f"{name} missing from [tool.setuptools] packages"
