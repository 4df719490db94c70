"""The library is Flower-agnostic: importing every fl_unlearn module never imports flwr."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fl_unlearn


def test_fl_unlearn_never_imports_flower():
    modules = [m.name for m in pkgutil.walk_packages(fl_unlearn.__path__, "fl_unlearn.") if not m.name.endswith("__main__")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print(sorted(k for k in sys.modules if k == 'flwr' or k.startswith('flwr.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
