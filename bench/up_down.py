"""Wall time of `starling up` and `starling down` for EC2 clusters of 1, 4, 16, 32 and 64 nodes,
on the end-to-end rig (LocalStack + a real sshd in a private network namespace), with what `up`
costs this machine: its CPU time, and the bytes it sent the master and each other node. Run it
through the rig:

    STARLING_RIG_PLAIN_SHELL=1 tests/e2e/run.sh python3 bench/up_down.py [runs] [largest]

STARLING_BENCH_STARLINGD=PATH hands out that starlingd (a release build) instead of the rig's
debug one.
With STARLING_RIG_PLAIN_SHELL=1 the rig's SSH commands do not source this machine's root
~/.bashrc, whose `pyenv init` (once per command, under a lock) otherwise takes most of the two
cores when many nodes log in at once (tests/e2e/inside.sh); an EC2 image's shell does not do
that either. For the same reason the engines' Python is this machine's interpreter itself
(`sys.executable`), not the pyenv shim `python3` finds: a bash script that costs ~0.1 s of CPU
per start, three starts per node.

Every node is bootstrapped for real: SSH login, starlingd (uploaded to the master, handed on by
it to the others), config, controller and one engine per node, registration. What it cannot
show is EC2's own boot time (LocalStack's instances run at once): the figures are starling's own
cost on top of that.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARLING = os.path.join(ROOT, "target/debug/starling")
RIG = os.environ.get("STARLING_RIG")
if not RIG:
    sys.exit("run this through the rig: tests/e2e/run.sh python3 bench/up_down.py")
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
LARGEST = int(sys.argv[2]) if len(sys.argv) > 2 else 64

home = tempfile.mkdtemp(prefix="starling-bench-")
os.makedirs(os.path.join(home, ".ssh"))
shutil.copy(os.path.join(RIG, "userkey"), os.path.join(home, ".ssh/id_ed25519"))
os.chmod(os.path.join(home, ".ssh/id_ed25519"), 0o600)
env = dict(os.environ, HOME=home, STARLING_HOME=os.path.join(home, ".starling"))
# A release build's starlingd, as users run (the rig's is the debug build's): smaller to hand
# out, faster to start.
if os.environ.get("STARLING_BENCH_STARLINGD"):
    env["STARLINGD"] = os.environ["STARLING_BENCH_STARLINGD"]


def starling(*args):
    """Runs the CLI; its wall time, CPU time (user + system, with its children) and stdout."""
    before = os.times()
    t = time.perf_counter()
    out = subprocess.run(
        [STARLING, *args],
        check=False,
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    if out.returncode != 0:
        sys.exit(f"starling {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return wall, cpu, out.stdout


plain = os.environ.get("STARLING_RIG_PLAIN_SHELL") == "1"
print(
    f"starlingd: {os.path.getsize(env['STARLINGD']) / 1e6:.1f} MB; {os.cpu_count()} cores; "
    f"SSH commands {'without' if plain else 'with'} root's ~/.bashrc"
)
print(
    f"{'nodes':>5}  {'run':>3}  {'up s':>6}  {'boot max s':>10}  {'down s':>6}  {'client CPU s':>12}"
    f"  {'MB to master':>12}  {'KB to each other node':>21}"
)
results = {}
for subnet, nodes in [
    (s, n) for s, n in ((10, 1), (11, 4), (12, 16), (13, 32), (14, 64)) if n <= LARGEST
]:
    for run in range(RUNS):
        name = f"bench-{nodes}"
        spec = os.path.join(home, f"{name}.yaml")
        with open(os.path.join(ROOT, "templates/localstack.yaml")) as f:
            text = f.read()
        text = text.replace("nodes: 2", f"nodes: {nodes - 1}").replace(
            "engines_per_node: 2", "engines_per_node: 1"
        )
        text = text.replace("subnet-000000000057a4100", f"subnet-000000000057a41{subnet:02x}")
        text += f"python: {sys.executable}\n"
        with open(spec, "w") as f:
            f.write(text)
        up, cpu, out = starling("up", "-f", spec, "--name", name, "--output", "json")
        launched = json.loads(out)
        assert len(launched["engines"]) == nodes, launched
        boots = [n["seconds"] for n in launched["nodes"]]
        sent = {n["node"]: n["sent_bytes"] for n in launched["nodes"]}
        others = [b for node, b in sent.items() if node != "master"]
        down, _, _ = starling("down", name)
        results.setdefault(nodes, []).append((up, down, sum(sent.values())))
        each = f"{statistics.mean(others) / 1e3:.1f}" if others else "-"
        print(
            f"{nodes:>5}  {run + 1:>3}  {up:>6.2f}  {max(boots):>10.2f}  {down:>6.2f}  {cpu:>12.2f}"
            f"  {sent['master'] / 1e6:>12.2f}  {each:>21}"
        )

one = min(u for u, _, _ in results[1])
one_bytes = min(b for _, _, b in results[1])
for nodes in sorted(results)[1:]:
    best = min(u for u, _, _ in results[nodes])
    sent = min(b for _, _, b in results[nodes])
    print(
        f"{nodes} nodes: up {best / one:.2f}x one node's, "
        f"bytes sent {sent / one_bytes:.2f}x one node's ({sent / 1e6:.2f} MB)"
    )
shutil.rmtree(home)
