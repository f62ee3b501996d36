"""Monte Carlo estimate of pi: the Python side of examples/montecarlo_pi.rs and of the
README's one-liner. Each task counts how many random points of the unit square fall inside
the quarter circle; 4 * hits / samples approaches pi."""
import random

SAMPLES_PER_TASK = 100_000


def hits(seed):
    rnd = random.Random(seed).random
    return sum(1 for _ in range(SAMPLES_PER_TASK) if rnd() ** 2 + rnd() ** 2 <= 1.0)
