"""The errors a starling client raises, with ipyparallel's names."""

from __future__ import annotations

import builtins
import concurrent.futures


class StarlingError(Exception):
    """Base class of starling's own errors."""


class RemoteError(StarlingError):
    """An exception raised on an engine; its printed form shows the remote traceback.

    ``ename``, ``evalue`` and ``traceback`` are the exception's type name, message and
    formatted traceback there; ``engine_id`` is the engine it was raised on."""

    def __init__(self, ename: str, evalue: str = "", traceback: str = "", engine_id=None):
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_id = engine_id

    def __str__(self) -> str:
        where = "" if self.engine_id is None else f"[Engine {self.engine_id}] "
        return f"{where}{self.ename}: {self.evalue}"

    def render_traceback(self) -> list:
        return (self.traceback.rstrip("\n") or str(self)).splitlines()

    def _render_traceback_(self) -> list:
        # IPython shows this instead of the local traceback.
        where = "" if self.engine_id is None else f"[{self.engine_id}:{self.ename}]: "
        return [where + line if i == 0 else line for i, line in enumerate(self.render_traceback())]

    def print_traceback(self) -> None:
        print("\n".join(self._render_traceback_()))


def _where(e) -> str:
    # A task that never ran (aborted, timed out or impossible while queued) has no engine.
    return "-" if e.engine_id is None else str(e.engine_id)


class CompositeError(RemoteError):
    """Several remote errors at once (one per failed engine, task or item): ``elist``."""

    def __init__(self, message: str, elist: list):
        first = elist[0] if elist else RemoteError("CompositeError")
        super().__init__(first.ename, first.evalue, first.traceback, first.engine_id)
        self.message = message
        self.elist = elist

    def __str__(self) -> str:
        lines = [self.message]
        for e in self.elist[:10]:
            lines.append(f"[{_where(e)}:{e.ename}] {e.evalue}")
        if len(self.elist) > 10:
            lines.append(f"... {len(self.elist) - 10} more exceptions ...")
        return "\n".join(lines)

    def _render_traceback_(self) -> list:
        lines = [self.message]
        for e in self.elist[:10]:
            lines.append(
                f"[{_where(e)}:{e.ename}]: "
                + (e.traceback.rstrip("\n") or f"{e.ename}: {e.evalue}")
            )
        if len(self.elist) > 10:
            lines.append(f"... {len(self.elist) - 10} more exceptions ...")
        return "\n".join(lines).splitlines()

    def raise_exception(self, index: int = 0):
        raise self.elist[index]


_timeout_bases = tuple(dict.fromkeys([builtins.TimeoutError, concurrent.futures.TimeoutError]))


class TimeoutError(*_timeout_bases):  # noqa: A001 - ipyparallel's name
    """A result was not ready within the time asked for."""


class SerializationError(StarlingError, TypeError):
    """A value could not be pickled here or unpickled there."""
