"""Gate limits as the command line gives them: one number for every name, or NAME=NUMBER,... for some."""

from __future__ import annotations

import math
from collections.abc import Callable

from compressor.errors import UserError


def parse_limits(text: str, usage: str) -> float | dict[str, float]:
    """'0.05' -> 0.05; 'code=0.05,math=0.1' -> {'code': 0.05, 'math': 0.1}; UserError(usage) for anything else
    (an empty or repeated name, a value that is not a number). Range checks are the caller's."""
    try:
        if "=" not in text:
            return float(text)
        limits = {}
        for name, value in (part.split("=", 1) for part in text.split(",")):
            if not name.strip() or name.strip() in limits:
                raise ValueError
            limits[name.strip()] = float(value)
    except ValueError:
        raise UserError(usage) from None
    return limits


def check_limits(gate, what: str, requirement: str, accept: Callable[[float], bool] = lambda limit: True):
    """`gate` as given (None, a number or {name: number}) when every limit is a finite number that `accept`s;
    UserError "WHAT limit [for NAME] must be REQUIREMENT, not X" otherwise."""
    if gate is None:
        return None
    for name, limit in (gate.items() if isinstance(gate, dict) else [("", gate)]):
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not math.isfinite(limit) \
                or not accept(limit):
            where = f" for {name}" if name else ""
            raise UserError(f"{what} limit{where} must be {requirement}, not {limit!r}")
    return gate
