"""Dependencies, retries, timeouts, abort and the task store from Python, on a real cluster."""

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from starling import Dependency, RemoteError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stamp(pause=0.1):
    import time

    t0 = time.time()
    time.sleep(pause)
    return t0, time.time()


def test_after_waits_follow_stays_and_impossible_dependencies_fail(rc):
    lv = rc.load_balanced_view()
    a = lv.apply_async(stamp)
    with lv.temp_flags(after=a):
        b = lv.apply_async(stamp)
    with lv.temp_flags(after=[a, b]):
        c = lv.apply_async(stamp)
    assert b.get()[0] >= a.get()[1]
    assert c.get()[0] >= b.get()[1]

    with lv.temp_flags(follow=a, chunksize=1):
        where = lv.map_async(lambda x: x, range(8))
        where.get()
    assert set(where.engine_ids) == {a.metadata["engine_id"]}

    bad = lv.apply_async(lambda: 1 / 0)
    with lv.temp_flags(after=bad):
        never = lv.apply_async(stamp)
    with pytest.raises(RemoteError) as e:
        never.get(timeout=10)
    assert e.value.ename == "ImpossibleDependency"
    assert "ZeroDivisionError" in str(e.value)
    with lv.temp_flags(after=Dependency([bad], success=False, failure=True)):
        assert lv.apply_sync(lambda: "ran because it failed") == "ran because it failed"
    with lv.temp_flags(after=Dependency([bad, a], all=False)):
        assert lv.apply_sync(lambda: "any is enough") == "any is enough"
    with pytest.raises(TypeError, match="a dependency is a job id"):
        with lv.temp_flags(after="nope"):
            lv.apply_async(stamp)


def test_retries_timeout_and_attempts_in_metadata(rc, tmp_path):
    lv = rc.load_balanced_view()
    counter = tmp_path / "tries"

    def flaky(path):
        with open(path, "a") as f:
            f.write("x")
        with open(path) as f:
            n = len(f.read())
        if n < 3:
            raise ValueError(f"try {n}")
        return n

    with lv.temp_flags(retries=2):
        ar = lv.apply_async(flaky, str(counter))
        assert ar.get(timeout=30) == 3
    assert ar.metadata["attempts"] == 3

    t0 = time.monotonic()
    with lv.temp_flags(timeout=0.5):
        slow = lv.apply_async(time.sleep, 30)
    with pytest.raises(RemoteError) as e:
        slow.get(timeout=15)
    assert e.value.ename == "TaskTimeout"
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        with lv.temp_flags(timeout=-1):
            lv.apply_async(stamp)


def test_abort_and_send_signal(rc):
    lv = rc.load_balanced_view()
    with lv.temp_flags(chunksize=1):
        ar = lv.map_async(lambda x: time.sleep(0.3) or x, range(40))
    ar.abort()
    assert ar.wait(15)
    assert not ar.successful()
    assert any(m["status"] == "error" for m in ar.metadata)
    with pytest.raises(RemoteError, match="TaskAborted"):
        ar.get()
    with pytest.raises(RuntimeError, match="already finished"):
        ar.abort()

    long = rc[0].execute("import time; time.sleep(60)")
    deadline = time.monotonic() + 10
    while not long.ready() and time.monotonic() < deadline:
        assert rc.send_signal(signal.SIGINT, targets=[0]) == [0]
        long.wait(0.3)
    with pytest.raises(RemoteError) as e:
        long.get(timeout=5)
    assert e.value.ename == "KeyboardInterrupt"
    with pytest.raises(ValueError, match="SIGINT only"):
        rc.send_signal(signal.SIGTERM)


def test_db_query_resubmit_purge_and_get_result_from_the_store(rc, cli):
    lv = rc.load_balanced_view()
    with lv.temp_flags(label="py-store"):
        ar = lv.map_async(lambda x: x + 1, range(5))
    assert ar.get() == [1, 2, 3, 4, 5]
    records = rc.db_query({"label": "py-store"})
    assert [r["job"] for r in records] == [ar.job_id]
    r = records[0]
    assert r["status"] == "ok" and r["kind"] == "map" and r["items"] == 5
    assert isinstance(r["submitted"], datetime.datetime)
    assert rc.db_query({"label": "py-store"}, keys=["status"]) == [
        {"job": ar.job_id, "status": "ok"}
    ]
    hour_ago = datetime.datetime.now() - datetime.timedelta(hours=1)
    assert rc.db_query({"label": "py-store", "submitted": {"$gt": hour_ago}})
    assert not rc.db_query({"label": "py-store", "submitted": {"$lt": hour_ago}})
    with pytest.raises(RuntimeError, match="unknown key 'msg_id'"):
        rc.db_query({"msg_id": 1})
    assert ar.job_id in rc.hub_history()

    again = rc.resubmit(ar.job_id)
    assert again.get() == [1, 2, 3, 4, 5]
    assert again.job_id != ar.job_id

    # A job submitted from the CLI, read back from Python.
    job = json.loads(
        cli("map", "lambda x: -x", "--range", "3", "--noblock", "--output", "json").stdout
    )["job"]
    assert rc.get_result(job).get() == [0, -1, -2]

    assert rc.purge_results([ar, again]) == 2
    assert not rc.db_query({"label": "py-store"})


def test_the_dag_example_runs_every_task_after_its_parents(cluster):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "dag.py"), "--cluster", "pytest"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "50 tasks" in p.stdout
    assert "every task started after all its parents had finished" in p.stdout


def slow_square(x):
    import time

    time.sleep(0.01)
    return x * x


def test_a_map_survives_its_controller_killed_and_restarted():
    from starling import Client, Cluster

    cluster = Cluster(n=2, name="phoenix-py", shutdown_atexit=False)
    cluster.start()
    try:
        rc = cluster.connect_client()
        ar = rc.load_balanced_view().map_async(slow_square, range(600), chunksize=1)
        deadline = time.monotonic() + 30
        while ar.progress < 100:
            assert time.monotonic() < deadline, "the map did not get going"
            time.sleep(0.01)
        status = subprocess.run(
            ["starling", "status", "phoenix-py", "--output", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        # A blocking call waits for its job's end in one native call: the lost connection
        # ends that wait too, with the way back to the job.
        blocked = []

        def block_on_a_long_apply():
            try:
                rc[0].apply_sync(time.sleep, 600)
            except RuntimeError as e:
                blocked.append(str(e))

        watcher = Client(cluster="phoenix-py")
        before = len(watcher.hub_history())
        waiting = threading.Thread(target=block_on_a_long_apply)
        waiting.start()
        while len(watcher.hub_history()) == before:
            assert time.monotonic() < deadline, "the blocking apply was not accepted"
            time.sleep(0.01)
        long_job = max(watcher.hub_history())
        watcher.close()
        os.kill(json.loads(status.stdout)["controller_pid"], signal.SIGKILL)
        waiting.join(timeout=30)
        assert not waiting.is_alive(), "a blocking apply kept waiting after the controller died"
        assert len(blocked) == 1 and f"rc.get_result({long_job})" in blocked[0], blocked
        # The lost connection ends the job's wait, as a Future: done() turns true.
        while not ar.done():
            assert time.monotonic() < deadline + 30, "done() stayed false after the controller died"
            time.sleep(0.01)
        assert not ar.cancel(), "a job is aborted, not cancelled"
        with pytest.raises(RuntimeError, match=rf"rc\.get_result\({ar.job_id}\)"):
            ar.get(timeout=30)
        rc.close()

        subprocess.run(["starling", "restart", "phoenix-py"], check=True, capture_output=True)
        again = Client(cluster="phoenix-py")
        assert again.ids == [0, 1]
        # The restarted controller counts the long apply as ended; its kernel still sleeps.
        again.send_signal(signal.SIGINT, targets=[0])
        assert again.get_result(ar.job_id).get(timeout=60) == [x * x for x in range(600)]
        again.close()
    finally:
        cluster.stop()
