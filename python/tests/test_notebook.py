"""A Jupyter session with starling, cell by cell, on a real ipykernel (this venv's Python)
run by nbclient: a local cluster of 4 engines, ``%px``, ``%%px``, ``%pxresult``,
``sync_imports`` and ``map`` with its timings, each cell's output checked as a user reads it."""

from __future__ import annotations

import json
import os
import re
import sys

import ipykernel  # noqa: F401 - the kernel the notebook runs on must be installed
import nbclient
import nbformat
import pytest

from starling import _starling

CLUSTER = "notebook"
KERNEL = "starling-test-python"

# (name, source): the session, one cell each; the last cell stops the cluster.
CELLS = [
    (
        "start",
        f'from starling import Client, Cluster\ncluster = Cluster(n=4, name="{CLUSTER}"); cluster.start()',
    ),
    ("client", f'rc = Client(cluster="{CLUSTER}")'),
    ("ids", "rc.ids"),
    ("px", "%px sum(range(101))"),
    ("pxconfig", "%pxconfig --targets 1"),
    ("pids", "%%px --targets :-1\nimport os; print(os.getpid())"),
    ("noblock", "%%px --noblock\nimport time; time.sleep(0.5); 7"),
    ("pxresult", "%pxresult"),
    ("view", "v = rc[:]"),
    ("imports", "with v.sync_imports():\n    import time"),
    ("define", "def f(x):\n    time.sleep(1)\n    return x * x"),
    ("map_sync", "v.map_sync(f, range(10))"),
    ("map", "r = v.map(f, range(10)); r.ready(), r.elapsed"),
    ("timings", "r.get(); print(r.elapsed, r.serial_time)"),
    ("stop", "cluster.stop()"),
]


def _write_kernelspec(root) -> None:
    """A kernelspec for this very interpreter, so the notebook runs where starling is
    installed."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    doc = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "starling test (venv Python)",
        "language": "python",
    }
    (spec / "kernel.json").write_text(json.dumps(doc))


def _text(cell, kind: str) -> str:
    """A cell's output of one kind: ``stdout``/``stderr`` streams, ``result`` (the
    execute_result's text) or ``error`` (``ename: evalue`` and the traceback)."""
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream" and o.name == kind:
            parts.append(o.text)
        elif o.output_type == "execute_result" and kind == "result":
            parts.append(o.data.get("text/plain", ""))
        elif o.output_type == "error" and kind == "error":
            parts.append(f"{o.ename}: {o.evalue}\n" + "\n".join(o.traceback))
    return "".join(parts)


def _outs(text: str) -> dict:
    return {int(e): v for e, v in re.findall(r"^Out\[(\d+):\d+\]: (.*)$", text, re.M)}


def _down_if_up(name: str) -> None:
    try:
        _starling.down(name)
    except RuntimeError as e:
        if "no record of cluster" not in str(e):
            raise


@pytest.fixture
def session(tmp_path, monkeypatch):
    """Runs the session's notebook (errors recorded, not fatal, so the last cell still
    stops the cluster); gives ``{name: cell}`` after. The cluster is taken down in any
    case."""
    jupyter = tmp_path / "jupyter"
    _write_kernelspec(jupyter)
    monkeypatch.setenv("JUPYTER_PATH", os.fspath(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", os.fspath(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", os.fspath(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for _, source in CELLS]
    nb.metadata["kernelspec"] = {
        "name": KERNEL,
        "display_name": "starling test",
        "language": "python",
    }
    path = tmp_path / "session.ipynb"
    nbformat.write(nb, path)

    client = nbclient.NotebookClient(
        nbformat.read(path, as_version=4),
        kernel_name=KERNEL,
        timeout=300,
        allow_errors=True,
        resources={"metadata": {"path": os.fspath(tmp_path)}},
    )
    ran = None
    try:
        ran = client.execute()
    finally:
        stopped = ran is not None and "is down" in _text(ran.cells[-1], "result")
        if not stopped:
            # The notebook's last cell stops the cluster; this covers a cell or kernel that
            # failed before it.
            _down_if_up(CLUSTER)
    nbformat.write(ran, path)
    cells = dict(zip((name for name, _ in CELLS), ran.cells))
    for name, cell in cells.items():
        assert not _text(cell, "error"), f"cell {name!r} failed:\n{_text(cell, 'error')}"
    return cells


def test_a_notebook_session(session):
    cells = session

    assert "<Cluster notebook: 4 engines, running>" in _text(cells["start"], "result")
    assert _text(cells["ids"], "result") == "[0, 1, 2, 3]"

    out = _text(cells["px"], "stdout")
    assert _outs(out) == {i: "5050" for i in range(4)}, out
    assert len(out.strip().splitlines()) == 4

    out = _text(cells["pids"], "stdout")
    pids = {int(e): p for e, p in re.findall(r"^\[stdout:(\d+)\] (\d+)$", out, re.M)}
    assert sorted(pids) == [0, 1, 2], out
    assert len(set(pids.values())) == 3, "each engine is its own process"

    assert _text(cells["noblock"], "result") == "<AsyncResult(execute): pending>", (
        "0.5 s of work is not done at once"
    )
    assert not cells["pxconfig"].outputs
    # After `%pxconfig --targets 1`, a %%px without --targets runs on engine 1 alone.
    assert _outs(_text(cells["pxresult"], "stdout")) == {1: "7"}

    assert "importing time on engine(s)" in _text(cells["imports"], "stdout")
    assert _text(cells["map_sync"], "result") == "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"

    ready, elapsed = re.fullmatch(r"\((\w+), ([\d.e-]+)\)", _text(cells["map"], "result")).groups()
    assert ready == "False", "a map of 10 one-second items is not done at once"
    assert float(elapsed) < 1

    elapsed, serial = (float(x) for x in _text(cells["timings"], "stdout").split())
    assert elapsed < 3.5, "4 engines share 10 one-second items: 3 rounds"
    assert 9.5 <= serial <= 11, "the engines spent about 10 s in all"

    assert "is down" in _text(cells["stop"], "result")
