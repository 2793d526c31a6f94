"""Round-robin timing shared by the side-by-side benchmark scripts."""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def round_robin(
    forwards: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], rounds: int
) -> dict[str, list[list[float]]]:
    """Seconds per call of each forward: [input][round] for each name.

    Within a round each input goes through every forward in turn, in an order that alternates
    from round to round (as given, then reversed), so that no forward always runs right after
    the same other one. Call it under `torch.inference_mode()`, after a warm-up.
    """
    times = {name: [[] for _ in inputs] for name in forwards}
    for round_index in range(rounds):
        order = list(forwards) if round_index % 2 == 0 else list(reversed(forwards))
        for position, x in enumerate(inputs):
            for name in order:
                start = time.perf_counter()
                forwards[name](x)
                times[name][position].append(time.perf_counter() - start)
    return times


def median_ms(times: dict[str, list[list[float]]]) -> dict[str, float]:
    """Median milliseconds per call over every input and round."""
    return {
        name: statistics.median(t for per_input in runs for t in per_input) * 1e3
        for name, runs in times.items()
    }


def best_ms(times: dict[str, list[list[float]]]) -> dict[str, float]:
    """Mean over the inputs of each input's fastest round, in milliseconds: the time with the
    least interference from other processes on a shared machine (a forward's work is the same
    every round)."""
    return {
        name: statistics.mean(min(per_input) for per_input in runs) * 1e3
        for name, runs in times.items()
    }
