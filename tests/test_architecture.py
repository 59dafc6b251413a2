"""The import direction of the layers is part of the design: service > agents > envs > compression.

import-linter checks it on the installed package ([tool.importlinter] in pyproject.toml: the layers,
no service / search / RL library in the engine, no top-level ``compression`` etc.). The editable
install puts src/ on sys.path, where src/prunepilot/<layer> are symlinks to the layer folders, so
the tool sees the real modules; the second test shows that it does (a reversed contract breaks).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER_FOLDERS = {"compression": "compression", "envs": "envs", "agents": "agents", "service": "service", "migrations": "alembic"}


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_import_contracts_are_kept() -> None:
    run = lint_imports()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "BROKEN" not in run.stdout and "0 broken" in run.stdout


def test_import_linter_sees_the_real_imports(tmp_path: Path) -> None:
    """Contracts the code is known to break must fail: the graph is not empty (as it would be if
    the tool could not follow the install) and external imports are in it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    reversed_layers = {**layers, "id": "reversed", "layers": layers["layers"][::-1]}
    torch_in_engine = {"id": "torch", "name": "torch forbidden in the engine", "type": "forbidden",
                       "source_modules": ["prunepilot.compression"], "forbidden_modules": ["torch"]}
    lines = ["[tool.importlinter]", 'root_package = "prunepilot"', "include_external_packages = true"]
    for contract in (reversed_layers, torch_in_engine):
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {_toml(value)}" for key, value in contract.items()]
    cfg = tmp_path / "violated.toml"
    cfg.write_text("\n".join(lines) + "\n")
    run = lint_imports(str(cfg))
    assert run.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in run.stdout, run.stdout + run.stderr
    assert "prunepilot.agents" in run.stdout  # e.g. agents -> envs, upward in the reversed order


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_every_package_folder_is_installed() -> None:
    """pyproject lists packages explicitly (folders map into the prunepilot namespace)."""
    text = (ROOT / "pyproject.toml").read_text()
    for name, folder in LAYER_FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            dotted = ".".join(("prunepilot", name, *rel[1:]))
            assert f'"{dotted}"' in text, f"{dotted} missing from [tool.setuptools] packages"


def test_src_links_every_layer_folder() -> None:
    """src/prunepilot/<name> -> ../../<folder>: the package tree that the install and the static tools read."""
    for name, folder in LAYER_FOLDERS.items():
        link = ROOT / "src" / "prunepilot" / name
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} must be a symlink to {folder}/"


def test_benchmark_scripts_compile() -> None:
    """The benchmark scripts are outside the type-checked package; a syntax error there (seen once:
    a `global` after its first use) would only show on the day someone reruns them."""
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        compile(script.read_text(), str(script), "exec")  # raises SyntaxError
