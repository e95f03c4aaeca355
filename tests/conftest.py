"""Make the shared harness importable, and fixtures every test file may use."""

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import qemu_img, qemu_io_ok  # noqa: E402


@pytest.fixture
def d(tmp_path: Path) -> Path:
    """A directory with raw images (r.raw, r2.raw) and qcow2 ones (base.qcow2 and its
    overlay top.qcow2), made by QEMU's tools."""
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r2.raw"), "2M")
    qemu_io_ok("raw", tmp_path / "r2.raw", "write -P 1 1000 10", "write -P 7 1536k 64k")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(base), "64M")
    qemu_io_ok("qcow2", base, "write -P 0x11 0 100k", "write -z 1M 64k", "write -P 0x22 5M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io_ok("qcow2", top, "write -P 0x33 4k 4k", "write -z 5M 4k", "discard 1M 4k")
    return tmp_path

@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on a disk file system (not a memory one), where O_DIRECT works and
    buffered writes take the worker-thread path."""
    from blockd.drivers import file as file_driver

    with tempfile.TemporaryDirectory(dir="/var/tmp") as name:
        fd = os.open(name, os.O_RDONLY)
        try:
            fs = file_driver.filesystem_type(fd)
        finally:
            os.close(fd)
        if fs in file_driver._MEMORY_FS:
            pytest.skip(f"/var/tmp is on {fs}")
        yield Path(name)
