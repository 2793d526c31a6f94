"""Round-robin timing shared by the side-by-side benchmark scripts."""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def median_ms(
    forwards: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], rounds: int
) -> dict[str, float]:
    """Median milliseconds per call of each forward over `rounds` rounds of every input.

    Within a round each input goes through every forward in turn, in an order that alternates
    from round to round (as given, then reversed), so that no forward always runs right after
    the same other one. Call it under `torch.inference_mode()`, after a warm-up.
    """
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for round_index in range(rounds):
        order = list(forwards) if round_index % 2 == 0 else list(reversed(forwards))
        for x in inputs:
            for name in order:
                start = time.perf_counter()
                forwards[name](x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}
