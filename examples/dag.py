"""A random DAG of tasks on a starling cluster: each task starts only after its parents ended.

    python examples/dag.py [--cluster NAME] [--nodes 50] [--seed 1]

Builds a random directed acyclic graph (each node's parents are drawn from the nodes before
it, so there is no cycle), submits one load-balanced task per node with ``after=`` its
parents' AsyncResults, and checks, from the times the engines report, that every task started
after all its parents had finished.
"""

from __future__ import annotations

import argparse
import random
import time

from starling import Client


def work(node: int, pause: float) -> tuple:
    """A task: sleep a little; say when it ran, where, for which node."""
    import os
    import time

    t0 = time.time()
    time.sleep(pause)
    return node, t0, time.time(), int(os.environ["STARLING_ENGINE_ID"])


def random_dag(nodes: int, rng: random.Random, max_parents: int = 3) -> dict:
    """node -> its parents, all earlier nodes."""
    return {
        n: sorted(rng.sample(range(n), min(n, rng.randint(0, max_parents)))) for n in range(nodes)
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cluster", default=None)
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pause", type=float, default=0.05, help="seconds each task sleeps")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    dag = random_dag(args.nodes, rng)
    edges = sum(len(ps) for ps in dag.values())
    with Client(cluster=args.cluster) as rc:
        view = rc.load_balanced_view()
        started = time.monotonic()
        results = {}
        for node, parents in dag.items():
            with view.temp_flags(after=[results[q] for q in parents], label="dag"):
                results[node] = view.apply_async(work, node, args.pause)
        ran = {node: ar.get() for node, ar in results.items()}
        wall = time.monotonic() - started
        engines = len(rc.ids)

    late = [
        (node, parent)
        for node, parents in dag.items()
        for parent in parents
        if ran[node][1] < ran[parent][2]
    ]
    depth = {}
    for node, parents in dag.items():
        depth[node] = 1 + max((depth[q] for q in parents), default=0)
    print(
        f"{args.nodes} tasks, {edges} edges, longest path {max(depth.values())} tasks, "
        f"on {engines} engines in {wall:.2f} s"
    )
    used = sorted({r[3] for r in ran.values()})
    print(f"engines used: {used}")
    if late:
        print(f"FAILED: {len(late)} tasks started before a parent finished: {late[:5]}")
        return 1
    print("every task started after all its parents had finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
