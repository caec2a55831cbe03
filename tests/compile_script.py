"""Run a compile script in a child process (libtpu and the CUDA plugin read their flags once per process, at load)
and hand back the last JSON object it printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_compile_script(body: str, env_extra: dict[str, str] | None = None) -> dict:
    """`body` (dedented) run by this Python on the CPU platform from the repository root, with `env_extra` set;
    the last line of its stdout that starts with "{", parsed. Fails the test with the child's stderr otherwise."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1])
