"""Helpers for iotest scripts: a daemon under test, raw QMP, qemu tools, filters.

A test prints a transcript; ``check`` compares it with the test's
``.out`` file.  Filters replace what changes between runs (the scratch
directory, timestamps, the version string) with fixed placeholders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import harness  # noqa: E402
SCRATCH = tempfile.mkdtemp(prefix="blockd-iotest-")


def scratch(name: str) -> str:
    return os.path.join(SCRATCH, name)


def filter_text(text: str) -> str:
    text = text.replace(SCRATCH, "TEST_DIR")
    text = re.sub(r'"seconds": \d+, "microseconds": \d+', '"seconds": SECS, "microseconds": USECS', text)
    text = re.sub(r'"package": "[^"]*"', '"package": PACKAGE', text)
    text = re.sub(r'"micro": \d+, "minor": \d+, "major": \d+', '"micro": M, "minor": M, "major": M', text)
    return text


def log(obj: Any) -> None:
    print(filter_text(obj if isinstance(obj, str) else json.dumps(obj)))
    sys.stdout.flush()


class Daemon(harness.Daemon):
    """blockd (or, with BLOCKD_IOTEST_QSD=1, qemu-storage-daemon) in the scratch directory."""

    def __init__(self, *args: str) -> None:
        super().__init__(scratch(f"qmp-{time.monotonic_ns()}.sock"), *args,
                         qsd=bool(os.environ.get("BLOCKD_IOTEST_QSD")))


def qemu_io(*args: str) -> str:
    out = subprocess.run(["qemu-io", *args], capture_output=True, text=True)
    text = out.stdout + out.stderr
    text = re.sub(r"\d+ ops; [\d:.]+ sec \([^)]*\)", "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)
    return filter_text(text)


def qemu_img(*args: str) -> str:
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    return filter_text(out.stdout + out.stderr)


def cleanup() -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)
