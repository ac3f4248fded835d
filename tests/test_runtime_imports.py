"""The runtime at the bottom: the engine runners, the tokenizer and the engine-folder format import
without torch or transformers, as the vendored copy in a Triton repository does."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import prefixkv
from prefixkv.serving.repository import PACKAGE, RUNTIME_MODULES, vendor_runtime

BLOCK = """
import sys
class Block:  # importing torch or transformers raises, as it may under Triton's Python backend stub
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_runtime_imports_where_torch_and_transformers_raise(tmp_path):
    """The installed package: its lazy __init__, the runners, the tokenizer, the format, the image input."""
    code = """
import prefixkv
import prefixkv.engines, prefixkv.engines.onnxruntime, prefixkv.engines.base, prefixkv.engines.images
import prefixkv.tokenizer, prefixkv.engine_folder, prefixkv.profile, prefixkv.defaults, prefixkv.vision.serving
from prefixkv.engines import load_runner
assert "torch" not in sys.modules and "transformers" not in sys.modules
try:
    prefixkv.PrefixKVCache  # a torch API: its import is attempted only now, and blocked
except ImportError as err:
    print("LAZY", err)
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LAZY blocked: torch" in done.stdout


def test_the_vendored_runtime_imports_where_torch_and_transformers_raise(tmp_path):
    vendor_runtime(tmp_path / "prefixkv")
    code = f"""
sys.path.insert(0, {str(tmp_path)!r})
import prefixkv.engines.onnxruntime, prefixkv.tokenizer, prefixkv.engine_folder, prefixkv.vision.serving
assert prefixkv.engines.onnxruntime.__file__.startswith({str(tmp_path)!r})
print("OK")
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK" in done.stdout


def _prefixkv_imports(path: Path, module: str) -> set[str]:
    """Modules of prefixkv that ``path`` (module ``module``) imports, at any depth of the file."""
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "prefixkv":
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "prefixkv")
    return found


def test_the_vendored_modules_are_closed_under_their_imports():
    """Every prefixkv module a runtime module imports is vendored too (so no import fails in Triton)."""
    vendored = {"prefixkv." + name[:-3].replace("/", ".").removesuffix(".__init__") if name != "__init__.py" else "prefixkv"
                for name in RUNTIME_MODULES}
    vendored_names = {m.removesuffix(".__init__") for m in vendored}
    missing = {}
    for name in RUNTIME_MODULES:
        module = "prefixkv" if name == "__init__.py" else "prefixkv." + name[:-3].replace("/", ".").removesuffix(".__init__")
        for target in _prefixkv_imports(PACKAGE / name, module):
            as_file = PACKAGE.joinpath(*target.split(".")[1:])
            is_module = as_file.with_suffix(".py").is_file() or (as_file / "__init__.py").is_file()
            if is_module and target not in vendored_names:
                missing.setdefault(name, []).append(target)
    assert not missing, missing
    for heavy in ("exporter", "bench", "cli", "calibration.py", "evaluation.py", "cache.py", "models.py"):
        assert not any(n.startswith(heavy) for n in RUNTIME_MODULES), heavy


@pytest.mark.parametrize("name", ["engine_folder", "tokenizer", "profile", "defaults"])
def test_the_formats_import_nothing_of_torch(name):
    """The formats at the bottom: their module-level imports are the standard library, numpy and each other."""
    tree = ast.parse((Path(prefixkv.__file__).parent / f"{name}.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and not n.level}
    assert not names & {"torch", "transformers", "onnx", "onnxruntime"}, names
