"""``Cluster``: start and stop a cluster from Python, like ipyparallel's ``ipp.Cluster``.

It runs exactly what ``starling up`` and ``starling down`` run (the native ``up``/``down``).
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from . import _starling
from .client import Client


def _packaged_daemon() -> None:
    """Points starling at the ``starlingd`` that travels in this package, unless told
    otherwise (``STARLINGD``)."""
    if os.environ.get("STARLINGD"):
        return
    daemon = Path(__file__).with_name("bin") / "starlingd"
    if daemon.exists():
        os.environ["STARLINGD"] = os.fspath(daemon)


class Cluster:
    """A cluster started from Python.

    ``Cluster(n=4)`` is a local cluster of 4 engines whose kernels run this interpreter;
    ``Cluster(spec="cluster.yaml")`` starts what the spec says (EC2, SSH hosts, local).
    ``with Cluster(n=4) as rc:`` starts it, hands back a connected Client, and stops it after.
    ``Cluster(n=4, mpi=True)`` starts the kernels with ``mpiexec``, as the ranks of one MPI
    world (engine id N is rank N; needs Open MPI and mpi4py).
    A cluster started here is stopped when the interpreter exits, unless
    ``shutdown_atexit=False``."""

    def __init__(
        self,
        n: int | None = None,
        *,
        spec=None,
        name: str | None = None,
        python: str | None = None,
        mpi: bool = False,
        shutdown_atexit: bool = True,
    ):
        self.n = n
        self.mpi = mpi
        self.spec = os.fspath(spec) if spec is not None else None
        self.name = name
        # A local cluster's kernels run this very interpreter: same Python, same packages.
        self.python = python if python is not None or spec is not None else sys.executable
        self.shutdown_atexit = shutdown_atexit
        self.connection_file = None
        self.engines = []
        self.elapsed = None
        self._client = None
        self._running = False

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<Cluster {self.name or '(unnamed)'}: {len(self.engines)} engines, {state}>"

    def start(self) -> Cluster:
        """Starts the cluster; returns once every engine has registered."""
        _packaged_daemon()
        try:
            name, path, engines, elapsed = _starling.up(
                self.spec, self.n, self.name, self.python, self.mpi
            )
        except Exception:
            # `up` takes down what it started when it fails; a failure after that (or in this
            # binding) must not leave a cluster behind either.
            if self.name is not None:
                try:
                    _starling.down(self.name)
                except Exception:  # noqa: BLE001 - the first error is the one to see
                    pass
            raise
        self.name, self.connection_file, self.engines, self.elapsed = (
            name,
            os.fspath(path),
            engines,
            elapsed,
        )
        self._running = True
        if self.shutdown_atexit:
            atexit.register(self._stop_at_exit)
        return self

    start_cluster_sync = start

    def connect_client(self, **kwargs) -> Client:
        """A Client connected to this cluster."""
        if not self._running:
            raise RuntimeError("the cluster is not running; call start() first")
        self._client = Client(self.connection_file, **kwargs)
        return self._client

    connect_client_sync = connect_client

    def start_and_connect(self, n: int | None = None) -> Client:
        if n is not None:
            self.n = n
        self.start()
        return self.connect_client()

    start_and_connect_sync = start_and_connect

    def stop(self) -> str:
        """Stops the cluster and removes everything of it (what ``starling down`` does)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.name is None or not self._running:
            return f"cluster {self.name!r} is not running"
        said = _starling.down(self.name)
        self._running = False
        return said

    stop_cluster_sync = stop

    def _stop_at_exit(self) -> None:
        if self._running:
            try:
                self.stop()
            except Exception as e:  # noqa: BLE001 - at exit, say it and go on
                print(f"starling: could not stop cluster {self.name!r}: {e}", file=sys.stderr)

    def __enter__(self) -> Client:
        self.start()
        try:
            return self.connect_client()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
