"""Fair timing for the benchmarks: every side warmed up, sides interleaved with their order alternated, min and
median over repeats, and every ratio printed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Timing:
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def compare(sides: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time each side `repeats` times after `warmup` untimed runs each; round r runs the sides in order r % 2 ==
    0 forwards, backwards otherwise, so neither always runs first (caches, clocks, other load)."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in times.items()}


def ratio_line(label: str, numerator: Timing, denominator: Timing) -> str:
    """'label: 1.23x (min) / 1.20x (median)' — numerator seconds over denominator seconds."""
    return (f"{label}: {numerator.best / denominator.best:.2f}x (min) / "
            f"{numerator.median / denominator.median:.2f}x (median)")
