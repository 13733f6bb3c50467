"""The value checks params.yaml's keys are declared with (`key(check)` in `params.py`).

Each check takes the raw value and returns it normalised, or raises ValueError saying what is
allowed; loading turns that into a one-line ParamsError naming the key, e.g.
params key `train.epochs` is 0; allowed: a whole number >= 1
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, Callable, Union

from cifarlab.models.names import model_names


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a number")
    if not math.isfinite(value):
        raise ValueError("a finite number")
    return float(value)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a whole number >= 1")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a whole number >= 0")
    return value


def any_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("a whole number")
    return value


def int_at_least(low: int, why: str = "") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"a whole number >= {low}{why}")
        return value
    return check


def int_from_to(low: int, high: int, why: str = "") -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"a whole number from {low} to {high}{why}")
        return value
    return check


def positive_float(value: Any) -> float:
    if _number(value) <= 0:
        raise ValueError("a number > 0")
    return float(value)


def float_at_least(low: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if _number(value) < low:
            raise ValueError(f"a number >= {low:g}")
        return float(value)
    return check


def probability(value: Any) -> float:
    if not 0.0 <= _number(value) <= 1.0:
        raise ValueError("a number from 0 to 1")
    return float(value)


def fraction_below_one(value: Any) -> float:
    if not 0.0 <= _number(value) < 1.0:
        raise ValueError("a number >= 0 and < 1")
    return float(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty string")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value
    return check


def auto_or(inner: Callable[[Any], Any], inner_name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return inner(value)
        except ValueError:
            raise ValueError(f"auto or {inner_name}") from None
    return check


def null_or(inner: Callable[[Any], Any], inner_name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None:
            return value
        try:
            return inner(value)
        except ValueError:
            raise ValueError(f"null or {inner_name}") from None
    return check


FIND = "find"   # train.max_lr's word for "take lr_find's suggestion" (resolved by the max_lr stage)


def lr_or_find(value: Any) -> Union[float, str]:
    if value == FIND:
        return value
    try:
        return positive_float(value)
    except ValueError:
        raise ValueError("a number > 0 or `find` (take lr_find's suggestion)") from None


def device_name(value: Any) -> str:
    """runtime.device: auto, cpu, cuda (a free GPU of this machine) or cuda:N (GPU N, whatever holds it)."""
    kind, colon, index = value.partition(":") if isinstance(value, str) else ("", "", "")
    if value in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit() and str(int(index)) == index):
        return value
    raise ValueError("one of auto, cpu, cuda, cuda:N (N: a GPU's index, from 0)")


def host_port(value: Any) -> str:
    """HOST:PORT, e.g. node0.cluster:29400 or 10.0.0.5:29400."""
    host, colon, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (colon and host.strip() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("HOST:PORT with a port from 1 to 65535, e.g. node0:29400")
    return value


def md5_hex(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 32 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise ValueError("32 hexadecimal digits")
    return value.lower()


def model_name(value: Any) -> str:
    names = model_names()
    if value not in names:
        raise ValueError("one of " + ", ".join(names))
    return value


def key(check: Callable[[Any], Any]) -> Any:
    """Declare a params key whose value must pass `check`."""
    return field(metadata={"check": check})
