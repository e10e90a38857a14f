"""Step aside for an installed package of the same top-level name as a source directory.

The repository keeps its packages at the top level (`kernels/`, installed as `owq.kernels`). Run
from a checkout's root with that root on sys.path, `import kernels` (transformers imports PyPI's
`kernels` package) would find this directory instead; `load_shadowed` then loads the installed
package in its place, so the importer gets what it asked for.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def load_shadowed(name: str, init_file: str) -> None:
    """Put the installed package `name` (searched on sys.path without this checkout's root) into
    sys.modules[name]; the import in progress then returns it. ImportError if none is installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"no installed package {name!r}: {root}/{name} is owq's source (import it as "
            f"owq.{name}), found because {root} is on sys.path"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
