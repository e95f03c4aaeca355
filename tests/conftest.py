"""Make the shared harness importable, and fixtures every test file may use."""

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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
