"""``ops/`` is the ground floor of the import graph: the papers' operators and metrics import torch, numpy, scipy,
pycocotools and the standard library, never the application (``maskflow``), and do no file I/O or plotting (that is
``maskflow.data``, ``maskflow.storage`` and ``maskflow.viz``'s work). An AST scan of every module under ``ops/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[1] / "ops"

# top-level modules ops must not import: the application, plotting, files and storage
FORBIDDEN_MODULES = {"maskflow", "matplotlib", "PIL", "os", "pathlib", "shutil", "tempfile", "glob", "csv", "pickle",
                     "boto3", "smart_open", "pyarrow", "fsspec", "mlflow", "ray"}
# calls that read or write files, whatever module they come from
FILE_CALLS = {"open", "savefig", "imsave", "imwrite", "read_text", "write_text", "read_bytes", "write_bytes",
              "tofile", "fromfile", "loadtxt", "savetxt", "genfromtxt", "savez", "savez_compressed"}
# load/save of numpy and torch: ``np.save(path, x)`` / ``torch.load(path)``
SERIALISERS = {"np", "numpy", "torch"}


def problems(source: str, name: str = "<source>") -> list[str]:
    """Every forbidden import and file-I/O call in a module's source, as ``name:line: what``, in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        else:
            modules = []
        for module in modules:
            if module.split(".")[0] in FORBIDDEN_MODULES:
                found.append((node.lineno, f"imports {module}"))
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if called in FILE_CALLS or (owner in SERIALISERS and called in ("save", "load")):
                found.append((node.lineno, f"calls {owner + '.' if owner else ''}{called}()"))
    return [f"{name}:{line}: {what}" for line, what in sorted(found)]


@pytest.mark.parametrize("path", sorted(p.relative_to(OPS.parent).as_posix() for p in OPS.rglob("*.py")))
def test_ops_module_is_ground_floor(path):
    source = (OPS.parent / path).read_text()
    assert problems(source, path) == []


def test_scan_finds_each_kind_of_violation():
    source = "\n".join([
        "import numpy as np",
        "import torch.nn.functional as F",
        "from ops.warp import warp",
        "from maskflow.config import require",
        "import matplotlib.pyplot as plt",
        "def f(path, x):",
        "    from pathlib import Path",
        "    with open(path) as fh:",
        "        pass",
        "    np.save(path, x)",
        "    torch.load(path)",
        "    plt.gcf().savefig(path)",
        "    np.asarray(x).sum()",
    ])
    assert [p.split(": ", 1)[1] for p in problems(source)] == [
        "imports maskflow.config", "imports matplotlib.pyplot", "imports pathlib", "calls open()", "calls np.save()",
        "calls torch.load()", "calls savefig()"]
