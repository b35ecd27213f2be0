"""Importing the server (app, wire models, pipeline) must not load llama.cpp: a gateway or a
test can use them without the backend. Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "edgellm.server",
    "edgellm.server.app",
    "edgellm.server.wire",
    "edgellm.server.ollama_wire",
    "edgellm.server.responses",
    "edgellm.server.pipeline",
    "edgellm.structured",
    "edgellm.settings",
]


def test_server_imports_leave_llama_cpp_out() -> None:
    code = (
        f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
        "from edgellm.server import create_app\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp')\n"
        "assert not loaded, loaded\nprint('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_check_sees_llama_cpp_when_it_is_imported() -> None:
    """The check itself can fail: importing the backend package does load llama.cpp."""
    code = "import sys, edgellm.backends.llama_cpp.runner\nprint('llama_cpp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr
