"""The option types of ``ckpt``: durations, byte sizes and fractions as users write them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip

if TYPE_CHECKING:  # click >= 8.2 types ParamType by the value it converts to; 8.1's cannot be subscripted
    _FloatParam = click.ParamType[float]
    _IntParam = click.ParamType[int]
else:
    _FloatParam = _IntParam = click.ParamType


class Duration(_FloatParam):
    """``90``, ``90s``, ``30m``, ``1h``, ``7d``, ``2w`` → seconds."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value).lower())
        if m is None:
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 1h or 7d", param, ctx)
        return float(m.group(1)) * DURATION_UNITS_S.get(m.group(2) or "s", 1)


class ByteSize(_IntParam):
    """``500MB``, ``1.5GiB``, ``2000000`` → bytes."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
        if m is None or m.group(2) not in SIZE_UNITS:
            self.fail(f"{value!r} is not a size such as 500MB or 1.5GiB", param, ctx)
        return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


class Fraction(_FloatParam):
    """``10%``, ``1/5`` or ``0.1`` → a fraction in (0, 1]."""

    name = "fraction"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        text = str(value).strip()
        try:
            if text.endswith("%"):
                out = float(text[:-1]) / 100
            elif "/" in text:
                num, den = text.split("/", 1)
                out = float(num) / float(den)
            else:
                out = float(text)
        except (ValueError, ZeroDivisionError):
            out = -1.0
        if not 0 < out <= 1:
            self.fail(f"{value!r} is not a fraction such as 10%, 1/5 or 0.1", param, ctx)
        return out


def duration_text(seconds: float) -> str:
    """Seconds as the largest unit that holds them whole (``1h``, ``90s``), as ``--grace-period`` takes them."""
    for unit, size in sorted(DURATION_UNITS_S.items(), key=lambda kv: -kv[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"
