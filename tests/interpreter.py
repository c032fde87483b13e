"""Running a test file's Triton cases under Triton's CPU interpreter, from an ordinary pytest process.

TRITON_INTERPRET=1 must be set before triton is first imported, and it then changes how every Triton kernel
in the process behaves; so on a machine without CUDA such a file holds one test that runs the file again
in a child process with the variable set, and the child runs the cases. That cannot depend on test order
and leaves other tests' processes alone."""

import os
import subprocess
import sys
from pathlib import Path


def rerun_under_interpreter(test_file: str) -> str:
    """Run test_file in a child pytest under TRITON_INTERPRET=1; fail with its output. -> its summary line."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    assert r.returncode == 0, \
        f"interpreted Triton tests of {Path(test_file).name} failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    return r.stdout.strip().splitlines()[-1]
