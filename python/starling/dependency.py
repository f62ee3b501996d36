"""``Dependency``: the jobs a task waits for, with ipyparallel's ``all``/``success``/``failure``
flags, for the ``after`` and ``follow`` flags of a ``LoadBalancedView``."""

from __future__ import annotations


def job_ids(dependencies) -> list:
    """Job ids from an id, an ``AsyncResult``, or a collection of them."""
    if dependencies is None:
        return []
    if isinstance(dependencies, Dependency):
        return list(dependencies.jobs)
    if isinstance(dependencies, int) or hasattr(dependencies, "job_id"):
        dependencies = [dependencies]
    out = []
    for d in dependencies:
        if isinstance(d, Dependency):
            out.extend(d.jobs)
        elif hasattr(d, "job_id"):
            out.append(d.job_id)
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            out.append(d)
        else:
            raise TypeError(
                f"a dependency is a job id, an AsyncResult or a list of them, not {d!r}"
            )
    return out


class Dependency:
    """Jobs to wait for: ``Dependency([ar1, ar2], all=True, success=True, failure=False)``.

    With ``all`` every job must have ended as the flags say (else any one is enough);
    ``success`` and ``failure`` say which endings count. A dependency that can no longer be
    met fails the task at once with ``ImpossibleDependency``."""

    def __init__(
        self, dependencies=(), all: bool = True, success: bool = True, failure: bool = False
    ):  # noqa: A002 - ipyparallel's name
        if not (success or failure):
            raise ValueError("a Dependency must count success, failure, or both")
        self.jobs = job_ids(dependencies)
        self.all = bool(all)
        self.success = bool(success)
        self.failure = bool(failure)

    def as_tuple(self) -> tuple:
        return (self.jobs, self.all, self.success, self.failure)

    def __len__(self) -> int:
        return len(self.jobs)

    def __repr__(self) -> str:
        return f"Dependency({self.jobs}, all={self.all}, success={self.success}, failure={self.failure})"


def as_dependency(value) -> tuple | None:
    """What the native client takes for ``after``/``follow``: ``None`` or a tuple."""
    if value is None:
        return None
    if not isinstance(value, Dependency):
        value = Dependency(value)
    return value.as_tuple() if value.jobs else None
