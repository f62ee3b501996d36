"""pi by Monte Carlo with mpi4py: every rank counts the hits among its share of the samples
and rank 0 sums them with `reduce`. The same estimate as examples/montecarlo.py's `hits_np`
as a starling map, done the MPI way, over an MPI cluster's hostfile:

    starling up --local -n 4 --mpi                       # or a spec with `mpi: true`
    starling mpirun -- python3 examples/montecarlo_mpi.py 200000000

    starling put science examples/montecarlo_mpi.py montecarlo_mpi.py     # EC2 / SSH hosts
    starling mpirun science -- python3 montecarlo_mpi.py 200000000
"""

import sys

import numpy as np
from mpi4py import MPI

CHUNK = 1_000_000


def count_hits(n, seed):
    """Points of the unit square inside the quarter circle, among n random ones."""
    rng = np.random.default_rng(seed)
    hits = 0
    while n > 0:
        k = min(n, CHUNK)
        x, y = rng.random(k), rng.random(k)
        hits += int(np.count_nonzero(x * x + y * y <= 1.0))
        n -= k
    return hits


def main():
    comm = MPI.COMM_WORLD
    total = int(float(sys.argv[1])) if len(sys.argv) > 1 else 200_000_000
    started = MPI.Wtime()
    mine = total // comm.size + (1 if comm.rank < total % comm.size else 0)
    hits = comm.reduce(count_hits(mine, seed=comm.rank), op=MPI.SUM, root=0)
    if comm.rank == 0:
        took = MPI.Wtime() - started
        print(
            f"pi ~ {4 * hits / total:.6f} from {total:,} samples on {comm.size} ranks in {took:.2f} s"
        )


if __name__ == "__main__":
    main()
