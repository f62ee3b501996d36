"""Monte Carlo estimate of pi: the Python side of examples/montecarlo_pi.rs and of the
README's one-liner. Each task counts how many random points of the unit square fall inside
the quarter circle; 4 * hits / samples approaches pi."""

import random

SAMPLES_PER_TASK = 100_000


def hits(seed):
    rnd = random.Random(seed).random
    return sum(1 for _ in range(SAMPLES_PER_TASK) if rnd() ** 2 + rnd() ** 2 <= 1.0)


SAMPLES_PER_TASK_NP = 1_000_000


def hits_np(seed):
    """`hits` with NumPy, 1,000,000 samples a task: the map beside examples/montecarlo_mpi.py."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y = rng.random(SAMPLES_PER_TASK_NP), rng.random(SAMPLES_PER_TASK_NP)
    return int(np.count_nonzero(x * x + y * y <= 1.0))
