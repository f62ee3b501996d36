"""Wall time of `starling up` and `starling down` for EC2 clusters of 1, 4 and 16 nodes, on the
end-to-end rig (LocalStack + a real sshd in a private network namespace). Run it through the rig:

    tests/e2e/run.sh python3 bench/up_down.py [runs]

Every node is bootstrapped for real: SSH login, starlingd upload, config, controller and one
engine per node, registration. What it cannot show is EC2's own boot time (LocalStack's
instances run at once): the figures are starling's own cost on top of that.
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

home = tempfile.mkdtemp(prefix="starling-bench-")
os.makedirs(os.path.join(home, ".ssh"))
shutil.copy(os.path.join(RIG, "userkey"), os.path.join(home, ".ssh/id_ed25519"))
os.chmod(os.path.join(home, ".ssh/id_ed25519"), 0o600)
env = dict(os.environ, HOME=home, STARLING_HOME=os.path.join(home, ".starling"))


def starling(*args):
    t = time.perf_counter()
    out = subprocess.run([STARLING, *args], env=env, cwd=home, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"starling {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return wall, out.stdout


print(f"starlingd uploaded: {os.path.getsize(os.environ['STARLINGD']) / 1e6:.1f} MB; {os.cpu_count()} cores")
print(f"{'nodes':>5}  {'run':>3}  {'up s':>6}  {'boot max s':>10}  {'boot median s':>13}  {'down s':>6}")
results = {}
for subnet, nodes in ((10, 1), (11, 4), (12, 16)):
    for run in range(RUNS):
        name = f"bench-{nodes}"
        spec = os.path.join(home, f"{name}.yaml")
        with open(os.path.join(ROOT, "templates/localstack.yaml")) as f:
            text = f.read()
        text = text.replace("nodes: 2", f"nodes: {nodes - 1}").replace("engines_per_node: 2", "engines_per_node: 1")
        text = text.replace("subnet-000000000057a4100", f"subnet-000000000057a41{subnet:02x}")
        with open(spec, "w") as f:
            f.write(text)
        up, out = starling("up", "-f", spec, "--name", name, "--output", "json")
        launched = json.loads(out)
        assert len(launched["engines"]) == nodes, launched
        boots = [n["seconds"] for n in launched["nodes"]]
        down, _ = starling("down", name)
        results.setdefault(nodes, []).append((up, down))
        print(f"{nodes:>5}  {run + 1:>3}  {up:>6.2f}  {max(boots):>10.2f}  {statistics.median(boots):>13.2f}  {down:>6.2f}")

one = min(u for u, _ in results[1])
sixteen = min(u for u, _ in results[16])
print(f"best up: 1 node {one:.2f} s, 16 nodes {sixteen:.2f} s: 16 nodes cost {sixteen / one:.2f}x one node")
shutil.rmtree(home)
