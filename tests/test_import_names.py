"""Our source never hides an installed package of the same name.

transformers imports PyPI's `kernels` package; `benchmarks/` and `tests/` are on sys.path (pytest's
pythonpath, a script's own directory), and a checkout's root is on it under `python -c` / `-m`.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_script_or_test_module_is_named_like_an_installed_package():
    installed = set(importlib.metadata.packages_distributions())
    assert "kernels" in installed  # what transformers imports: the case this guards
    ours = {p.stem for d in ("benchmarks", "tests") for p in (ROOT / d).glob("*.py")}
    assert not ours & installed, f"rename these, they hide installed packages: {ours & installed}"


def test_the_source_kernels_dir_steps_aside_at_the_checkout_root():
    code = (
        "import transformers.activations, kernels\n"
        "from owq.kernels import OWQLinear\n"
        "import owq.kernels\n"
        "print(kernels.__file__)\n"
        "print(owq.kernels.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pypi, ours = done.stdout.split()
    assert "site-packages" in pypi and Path(ours) == ROOT / "kernels" / "__init__.py"
