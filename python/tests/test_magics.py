"""The IPython magics (``%px``, ``%%px``, ``%pxresult``, ``%pxconfig``, ``%autopx``) as a
user meets them: typed into a real IPython shell, run on a real local cluster of 2 engines,
judged by what the shell prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import starling
from starling import AsyncResult, CompositeError
from starling import magics as starling_magics

CLUSTER = "magics"


@pytest.fixture(scope="session")
def cluster():
    """A local cluster of 2 engines (what ``starling up --local -n 2`` starts)."""
    c = starling.Cluster(n=2, name=CLUSTER)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def shell(cluster, tmp_path_factory):
    """A real IPython shell, with its profile and history in a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPYTHONDIR", os.fspath(tmp_path_factory.mktemp("ipython")))
        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        ip = InteractiveShell.instance(config=config)
        yield ip


@pytest.fixture(scope="session")
def rc(shell, cluster):
    """The Client the magics use: creating it inside IPython registers them."""
    client = starling.Client(cluster.connection_file)
    yield client
    client.close()


@pytest.fixture
def px(shell, rc, capsys):
    """Runs a cell in the shell: ``px(cell)`` gives ``(result, stdout, stderr)``. Each test
    starts from %px's defaults (all engines, blocking, streaming, %autopx off)."""
    starling_magics.register(shell, rc)
    capsys.readouterr()

    def run(cell: str):
        result = shell.run_cell(cell, store_history=True)
        out, err = capsys.readouterr()
        return result, out, err

    run("%pxconfig --targets all --block --stream --no-verbose")
    yield run
    magics = starling_magics.register(shell, rc)
    if magics.autopx:
        run("%autopx")
    run("%pxconfig --targets all --block --stream --no-verbose")


def outs(text: str) -> dict:
    """``{engine: value}`` from the ``Out[engine:count]: value`` lines of some output."""
    return {int(e): v for e, v in re.findall(r"^Out\[(\d+):\d+\]: (.*)$", text, re.M)}


def stdouts(text: str) -> dict:
    """``{engine: text}`` from the ``[stdout:engine] text`` lines of some output."""
    return {int(e): v for e, v in re.findall(r"^\[stdout:(\d+)\] (.*)$", text, re.M)}


def test_creating_a_client_in_ipython_registers_the_magics(shell, rc):
    magics = shell.magics_manager.magics
    for name in ("px", "pxresult", "pxconfig", "autopx"):
        assert name in magics["line"], name
    assert "px" in magics["cell"]


def test_px_shows_the_value_of_the_final_expression_on_each_engine(px, rc):
    result, out, _ = px("%px sum(range(101))")
    assert result.success, out
    assert outs(out) == {i: "5050" for i in rc.ids}
    # Engine order, one line each, in the CLI's format.
    assert [int(e) for e in re.findall(r"^Out\[(\d+):", out, re.M)] == rc.ids
    assert re.search(r"^Out\[0:\d+\]: 5050$", out, re.M)


def test_the_execution_count_is_each_engines_own(px, rc):
    _, first, _ = px("%px 1")
    _, second, _ = px("%px 2")
    count = {int(e): int(n) for e, n in re.findall(r"^Out\[(\d+):(\d+)\]", first, re.M)}
    later = {int(e): int(n) for e, n in re.findall(r"^Out\[(\d+):(\d+)\]", second, re.M)}
    assert all(later[i] > count[i] for i in rc.ids)


def test_cell_px_with_a_slice_of_targets_runs_on_those_engines_only(px, rc):
    result, out, _ = px("%%px --targets :-1\nimport os; print(os.getpid())")
    assert result.success, out
    assert sorted(stdouts(out)) == rc.ids[:-1]

    _, out, _ = px("%%px\nimport os; print(os.getpid())")
    pids = stdouts(out)
    assert sorted(pids) == rc.ids
    assert len(set(pids.values())) == len(rc.ids), "each engine is its own process"
    assert str(os.getpid()) not in pids.values(), "the code ran on the engines, not here"


@pytest.mark.parametrize(
    "targets, expected",
    [("1", [1]), ("0,1", [0, 1]), ("[1]", [1]), ("::2", [0]), ("-1", [1]), ("all", [0, 1])],
)
def test_targets_take_ids_lists_slices_and_all(px, targets, expected):
    _, out, _ = px(f"%px --targets {targets} 6 * 7")
    assert outs(out) == {i: "42" for i in expected}


def test_noblock_returns_an_async_result_that_pxresult_shows(px, rc):
    result, out, _ = px("%%px --noblock\nimport time; time.sleep(0.5); 7")
    assert result.success, out
    ar = result.result
    assert isinstance(ar, AsyncResult)
    assert repr(ar) in ("<AsyncResult(execute): pending>", "<AsyncResult(execute): finished>")
    assert re.search(r"^Out\[\d+\]: <AsyncResult\(execute\): (pending|finished)>$", out, re.M), out
    assert outs(out) == {}, "nothing of the engines' is shown before %pxresult"

    result, out, _ = px("%pxresult")
    assert result.success, out
    assert outs(out) == {i: "7" for i in rc.ids}
    assert ar.ready()
    assert ar.get() == [7] * len(rc.ids)


def test_pxresult_without_a_job_says_so(shell, rc, px):
    starling_magics.register(shell, rc).last_result = None
    result, _, err = px("%pxresult")
    assert isinstance(result.error_in_exec, UsageError)
    assert "no %px job yet" in err


def test_pxconfig_sets_the_targets_and_blocking_of_later_px(px):
    px("%pxconfig --targets 1")
    _, out, _ = px("%px import os; os.getpid() > 0")
    assert outs(out) == {1: "True"}

    px("%pxconfig --noblock")
    result, _, _ = px("%px 3 + 4")
    assert isinstance(result.result, AsyncResult)
    assert result.result.get() == 7, "targets 1 is one engine: its result is one value"

    px("%pxconfig --targets all --block --verbose")
    _, out, _ = px("%px 5")
    assert "Parallel execution on engine(s): all" in out
    assert outs(out) == {0: "5", 1: "5"}


def test_pxconfig_refuses_an_engine_that_does_not_exist(px):
    result, _, err = px("%pxconfig --targets 7")
    assert isinstance(result.error_in_exec, UsageError)
    assert "no engine 7" in err
    _, out, _ = px("%px 1")
    assert sorted(outs(out)) == [0, 1], "the earlier targets still hold"


def test_out_stores_the_async_result_under_a_name(px, shell, rc):
    result, out, _ = px("%px -o ar 6 * 7")
    assert result.success, out
    assert isinstance(shell.user_ns["ar"], AsyncResult)
    assert shell.user_ns["ar"].get() == [42] * len(rc.ids)

    px("%%px --out cell_ar --noblock\n'x' * 3")
    assert shell.user_ns["cell_ar"].get() == ["xxx"] * len(rc.ids)


def test_an_error_shows_each_engines_traceback_and_raises(px, rc):
    result, out, _ = px("%px 1/0")
    assert not result.success
    assert isinstance(result.error_in_exec, CompositeError)
    assert sorted(e.engine_id for e in result.error_in_exec.elist) == rc.ids
    for i in rc.ids:
        assert f"[{i}:error] ZeroDivisionError: division by zero" in out
    assert out.count("Traceback (most recent call last)") == len(rc.ids)
    assert "1/0" in out, "the traceback shows the line that failed"
    assert "CompositeError" in out


def test_a_remote_error_from_the_client_shows_the_remote_traceback(px, shell, rc):
    shell.user_ns["rc"] = rc
    result, out, err = px("rc[0].apply_sync(lambda: 1/0)")
    assert isinstance(result.error_in_exec, starling.RemoteError)
    text = out + err
    assert "[0:ZeroDivisionError]: Traceback (most recent call last):" in text, text
    assert "in <lambda>" in text and "ZeroDivisionError: division by zero" in text, text


def test_output_before_an_error_is_shown_too(px):
    result, out, _ = px("%%px --targets 0\nprint('before')\nraise ValueError('bad value')")
    assert isinstance(result.error_in_exec, CompositeError)
    assert "[stdout:0] before" in out
    assert "[0:error] ValueError: bad value" in out
    assert out.index("[stdout:0] before") < out.index("[0:error]")


def test_stderr_is_labelled_and_goes_to_stderr(px, rc):
    _, out, err = px("%%px\nimport sys; print('oops', file=sys.stderr)")
    assert re.findall(r"^\[stderr:(\d+)\] oops$", err, re.M) == [str(i) for i in rc.ids]
    assert "oops" not in out


def test_local_runs_the_cell_here_too(px, shell, rc):
    result, out, _ = px("%%px --local\nboth_here_and_there = 21\nboth_here_and_there * 2")
    assert result.success, out
    assert shell.user_ns["both_here_and_there"] == 21
    assert outs(out) == {i: "42" for i in rc.ids}
    assert re.search(r"^Out\[\d+\]: 42$", out, re.M), (
        "the local value is shown as IPython's own Out"
    )

    _, out, _ = px("%px both_here_and_there")
    assert outs(out) == {i: "21" for i in rc.ids}


def test_stream_shows_every_engines_output(px, rc):
    result, out, _ = px("%%px --stream\nprint('streamed')\n'done'")
    assert result.success, out
    assert stdouts(out) == {i: "streamed" for i in rc.ids}
    assert outs(out) == {i: "'done'" for i in rc.ids}


def test_stream_shows_what_a_task_prints_while_it_runs(px, tmp_path, monkeypatch):
    # The task prints, then waits until the client has shown that line: it can only end (and
    # the cell pass) if the line was shown while the task still ran.
    flag = tmp_path / "shown"
    real = starling_magics.show_streamed

    def show(pieces, streamed):
        real(pieces, streamed)
        if any("first" in out for _, _, out, _ in pieces):
            flag.touch()

    monkeypatch.setattr(starling_magics, "show_streamed", show)
    cell = f"""%%px --targets 0
import os, time
print('first')
deadline = time.monotonic() + 30
while not os.path.exists({str(flag)!r}):
    if time.monotonic() > deadline:
        raise TimeoutError('the client never showed the first line')
    time.sleep(0.01)
print('second')
'done'
"""
    result, out, _ = px(cell)
    assert result.success, out
    lines = [line for line in out.splitlines() if line]
    # The streamed line once, the rest after it, then the value.
    assert lines[:2] == ["[stdout:0] first", "[stdout:0] second"], out
    assert outs(out) == {0: "'done'"}

    # With --no-stream (here through %pxconfig), all of it once the task is done.
    flag.unlink()
    px("%pxconfig --no-stream")
    quick = "%%px --targets 0\nprint('first')\nprint('second')\n'done'"
    result, out, _ = px(quick)
    assert result.success and "[stdout:0] first\nsecond\n" in out, out


def test_group_outputs_by_type_shows_all_stdout_before_the_values(px, rc):
    _, out, _ = px("%%px --group-outputs=type\nprint('printed')\n'value'")
    lines = [line for line in out.splitlines() if line]
    assert lines[: len(rc.ids)] == [f"[stdout:{i}] printed" for i in rc.ids]
    assert outs(out) == {i: "'value'" for i in rc.ids}

    _, out, _ = px("%%px --group-outputs=engine\nprint('printed')\n'value'")
    assert out.index("[stdout:0] printed") < out.index("Out[0:") < out.index("[stdout:1] printed")

    # ipyparallel's default and short flags: by type unless -e; -a does not block, -b does.
    _, by_type, _ = px("%%px\nprint('printed')\n'value'")
    assert by_type.index("[stdout:1] printed") < by_type.index("Out[0:")
    _, by_engine, _ = px("%%px -e\nprint('printed')\n'value'")
    assert by_engine.index("Out[0:") < by_engine.index("[stdout:1] printed")
    result, _, _ = px("%px -a 6 * 7")
    assert isinstance(result.result, AsyncResult) and result.result.get() == [42, 42]
    result, out, _ = px("%px -b 6 * 7")
    assert result.result is None and outs(out) == {0: "42", 1: "42"}


def test_autopx_runs_every_cell_on_the_engines_until_turned_off(px, shell, rc):
    shell.user_ns.pop("autopx_value", None)
    _, out, _ = px("%autopx")
    assert "%autopx enabled" in out

    result, out, _ = px("autopx_value = 3 * 11\nautopx_value")
    assert result.success, out
    assert outs(out) == {i: "33" for i in rc.ids}
    assert "autopx_value" not in shell.user_ns, "the cell ran on the engines, not here"

    result, out, _ = px("%pxconfig --targets 0")
    assert result.success, "a magic still runs here while %autopx is on"
    _, out, _ = px("autopx_value + 1")
    assert outs(out) == {0: "34"}

    _, out, _ = px("%autopx")
    assert "%autopx disabled" in out
    result, _, _ = px("autopx_value")
    assert isinstance(result.error_in_exec, NameError), "cells run here again"


def test_activate_gives_a_view_magics_of_its_own(px, shell, rc):
    one = rc[[1]]
    one.block = True
    one.activate("_one")
    _, out, _ = px("%px_one 6 * 7")
    assert outs(out) == {1: "42"}, out
    result, out, _ = px("%%px_one --noblock\n'cell'")
    assert isinstance(result.result, AsyncResult)
    _, out, _ = px("%pxresult_one")
    assert outs(out) == {1: "'cell'"}, out
    _, out, _ = px("%px 6 * 7")
    assert outs(out) == {0: "42", 1: "42"}, "%px itself is unchanged"
    # Client.activate: %px itself on other engines, blocking.
    rc.activate(targets=[0])
    _, out, _ = px("%px 6 * 7")
    assert outs(out) == {0: "42"}, out


def test_bad_options_are_usage_errors(px):
    result, _, err = px("%px --targets 9 1")
    assert isinstance(result.error_in_exec, UsageError)
    assert "no engine 9" in err
    result, _, err = px("%px --targets zero 1")
    assert isinstance(result.error_in_exec, UsageError)
    assert "--targets 'zero'" in err
    result, _, _ = px("%px")
    assert isinstance(result.error_in_exec, UsageError)


def test_load_ext_connects_on_first_use(cluster, tmp_path):
    """``%load_ext starling`` in a fresh IPython, then ``%px``: the magics make a Client on
    the only cluster (here: STARLING_CLUSTER's) when first used."""
    env = dict(os.environ, STARLING_CLUSTER=CLUSTER, IPYTHONDIR=os.fspath(tmp_path))
    code = "%load_ext starling\n%px 40 + 2"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            "--quick",
            "--no-banner",
            "--HistoryManager.hist_file=:memory:",
            "-c",
            code,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert outs(done.stdout) == {0: "42", 1: "42"}, done.stdout + done.stderr
