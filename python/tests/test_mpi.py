"""MPI engines from Python: ``Cluster(n=2, mpi=True)`` starts the kernels as the ranks of one
MPI world (Open MPI's ``mpiexec``, mpi4py in this venv); ``apply``, views and ``%px`` see
engine N as rank N."""

import os
import re

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import starling
from starling import magics as starling_magics


@pytest.fixture(scope="module")
def mpi_rc(tmp_path_factory):
    c = starling.Cluster(n=2, name="pympi", mpi=True, shutdown_atexit=False)
    c.start()
    rc = starling.Client(c.connection_file)
    try:
        yield rc
    finally:
        rc.close()
        c.stop()


def ranks():
    from mpi4py import MPI

    return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size


def test_apply_runs_on_each_rank_and_collectives_span_the_world(mpi_rc):
    assert mpi_rc.ids == [0, 1]
    v = mpi_rc[:]
    assert v.apply_sync(ranks) == [(0, 2), (1, 2)]
    v.execute("from mpi4py import MPI\nimport numpy as np\nc = MPI.COMM_WORLD", block=True)
    # A NumPy array from rank 0 to every rank, then a sum across them.
    v.execute(
        "a = np.arange(10.0) if c.rank == 0 else np.zeros(10)\nc.Bcast(a, root=0)\n"
        "total = c.allreduce(float(a.sum()) * (c.rank + 1))",
        block=True,
    )
    assert v.pull("total", block=True) == [135.0, 135.0]
    assert mpi_rc[1].apply_sync(ranks) == (1, 2)


def test_px_magic_on_an_mpi_cluster(mpi_rc, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", os.fspath(tmp_path))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    starling_magics.register(shell, mpi_rc)
    capsys.readouterr()
    shell.run_cell("%px from mpi4py import MPI; MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.rank + 1)")
    out = capsys.readouterr().out
    assert re.findall(r"^Out\[(\d+):\d+\]: (.*)$", out, re.M) == [("0", "3"), ("1", "3")], out
