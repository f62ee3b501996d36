"""The wheel a user installs with pip: alone, in a fresh venv, it gives a working local cluster.

`scripts/python.sh wheel` builds it into target/wheels (scripts/test.sh does)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cloudpickle

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_alone_gives_a_working_local_cluster(tmp_path):
    wheels = sorted((ROOT / "target" / "wheels").glob("starling_cluster-*.whl"))
    assert wheels, "no wheel in target/wheels: `scripts/python.sh wheel` builds it"
    wheel = wheels[-1]
    daemon = ROOT / "python" / "starling" / "bin" / "starlingd"
    assert wheel.stat().st_mtime >= daemon.stat().st_mtime, (
        f"{wheel.name} is older than the last build: `scripts/python.sh wheel` packs it anew"
    )
    assert "-cp39-abi3-" in wheel.name, wheel.name
    assert "starling/bin/starlingd" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", os.fspath(venv)], check=True)
    py = venv / "bin" / "python"
    # Nothing from the network: the wheel, and its one dependency (cloudpickle) from this venv.
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        + ["--disable-pip-version-check", os.fspath(wheel)],
        check=True,
    )
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shutil.copytree(Path(cloudpickle.__file__).parent, Path(site) / "cloudpickle")

    # Run from elsewhere, with no starlingd or starling on PATH and no STARLINGD: only what
    # pip installed.
    env = {k: v for k, v in os.environ.items() if k not in ("STARLINGD", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if "target" not in p and ".venv" not in p
    )
    env["STARLING_HOME"] = os.fspath(tmp_path / "home")
    code = """
import os, starling
print(starling.__file__)
with starling.Cluster(n=1, name="fromwheel") as rc:
    print(rc[:].apply_sync(lambda: 6 * 7))
    print(os.environ["STARLINGD"])
"""
    p = subprocess.run(
        [py, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stdout + p.stderr
    module, answer, daemon = p.stdout.split()
    assert module.startswith(site), module
    assert answer == "[42]"
    assert daemon == os.path.join(site, "starling", "bin", "starlingd")
    assert os.access(daemon, os.X_OK)
