"""engine/ and agent/ never import Qt; the pure engine modules do not even load torch (STYLE.md S1)."""

import subprocess
import sys

import pytest

QT_FREE = ["engine.layout", "engine.tree", "engine.wire", "engine.verify", "engine.coordinator",
           "engine.session", "engine.cli", "engine.stage", "engine.draft", "engine.models"]
TORCH_FREE = ["engine.layout", "engine.wire", "engine.prompts", "engine.config", "engine.events"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", QT_FREE)
def test_core_never_imports_qt(module):
    r = _run(f"import sys, {module}; bad = [m for m in ('PySide6', 'pyqtgraph', 'app') if m in sys.modules]; "
             "assert not bad, bad")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("module", TORCH_FREE)
def test_pure_modules_do_not_load_torch(module):
    r = _run(f"import sys, {module}; assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr


def test_engine_package_init_is_empty():
    r = _run("import sys, engine, agent; assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    assert r.returncode == 0, r.stderr


def test_import_linter_contracts_hold():
    exe = sys.executable.rsplit("/", 1)[0] + "/lint-imports"
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout
