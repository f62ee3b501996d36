"""Fixtures: real local clusters (real starlingd, real python3 kernels) on loopback.

Every test session gets its own STARLING_HOME, so nothing here touches the user's clusters;
each cluster a fixture starts is stopped at the end (``Cluster.stop`` runs ``starling down``).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

_HOME = tempfile.mkdtemp(prefix="starling-pytest-")
os.environ["STARLING_HOME"] = _HOME

import starling  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _home():
    yield _HOME
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    """A local cluster of 2 engines named 'pytest'."""
    c = starling.Cluster(n=2, name="pytest", shutdown_atexit=False)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def rc(cluster):
    client = starling.Client(cluster="pytest")
    yield client
    client.close()


@pytest.fixture
def cli(cluster):
    """Runs the `starling` CLI against the 'pytest' cluster; returns its stdout."""

    def run(*args, check=True):
        p = subprocess.run(
            ["starling", "--cluster", "pytest", *args], capture_output=True, text=True, timeout=120
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"starling {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}"
            )
        return p

    return run


def run_python(code: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Runs a Python program in a fresh interpreter with this venv's packages."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kwargs
    )
