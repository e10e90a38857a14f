"""Building and finding the compiled CPU module (`kernels/cpu_build.py`): a module built ahead
is imported as it is, a lock left by a killed build is removed, `OWQ_CPU_DECODE=0` turns it
off (tested with the runtime in `test_cpu_decode.py`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

from owq.kernels import cpu_build


def test_a_module_built_ahead_is_imported_as_it_is(tmp_path):
    """The CPU image builds the step once and has no compiler: `OWQ_CPU_DECODE_LIB` names it (a
    fresh process: one process keeps the first module of a name it imported)."""
    built = cpu_build.load()
    assert built is not None
    copy = tmp_path / "owq_cpu_decode.so"
    copy.write_bytes(Path(built.__file__).read_bytes())
    env = dict(os.environ, **{cpu_build.PREBUILT: str(copy)})
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "unused")  # nothing is built
    code = "from owq.kernels import cpu_build; m = cpu_build.load(); print(m.__file__, m.Stack)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == str(copy)
    assert not (tmp_path / "unused").exists()


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    """torch's builder would wait on it forever; a lock younger than any build is kept."""
    lock = tmp_path / "lock"
    lock.touch()
    cpu_build._stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - 11 * 60
    os.utime(lock, (old, old))
    cpu_build._stale_lock(tmp_path)
    assert not lock.exists()
    cpu_build._stale_lock(tmp_path)  # none there: nothing to do
