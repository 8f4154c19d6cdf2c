"""Valid ranges of numbers, declared once and checked the same way for config fields and flags.

A config field declares its range in its type (``lr: PositiveFloat = 5e-4``, an
``Annotated[float, Range(gt=0)]``); ``check_fields`` walks a (nested) dataclass and names the
first value out of range with its dotted key. A command-line flag takes the same ``Range`` as
its argparse type (``type=flag(int, AT_LEAST_1)``, in ``dino_skipless.cli``). Either way the
message says what was expected: ``optim.lr must be > 0, got -1.0``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Annotated, Any


@dataclass(frozen=True)
class Range:
    """``ge <= x`` / ``gt < x`` and ``x <= le`` / ``x < lt`` (None: unbounded); a float must also
    be finite (NaN and inf are never valid)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            return False
        if not math.isfinite(x):
            return False
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def __str__(self) -> str:
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {_num(lo)}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {_num(hi)}"
        return "a finite number"

    def check(self, name: str, x) -> None:
        """Raise ``ValueError('NAME must be RANGE, got X')`` when ``x`` is outside."""
        if x not in self:
            raise ValueError(f"{name} must be {self}, got {x!r}")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


FINITE = Range()
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_1 = Range(ge=1)
PROBABILITY = Range(ge=0, le=1)
BELOW_1 = Range(ge=0, lt=1)

# Field types with their range (the plain type is what YAML values and overrides coerce to).
FiniteFloat = Annotated[float, FINITE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegFloat = Annotated[float, NON_NEGATIVE]
Probability = Annotated[float, PROBABILITY]
FractionBelow1 = Annotated[float, BELOW_1]  # a share that must leave something: [0, 1)
PositiveInt = Annotated[int, AT_LEAST_1]
NonNegInt = Annotated[int, NON_NEGATIVE]


def field_range(tp: Any) -> Range | None:
    """The ``Range`` declared in a field's type (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Range)), None)
    for arg in typing.get_args(tp):  # Optional[Annotated[...]], Union[...]
        if typing.get_origin(arg) is Annotated:
            return field_range(arg)
    return None


def check_fields(obj, prefix: str = "") -> None:
    """Check every field of dataclass ``obj`` (and of the dataclasses inside it) against the
    range its type declares; ``ValueError`` names the first bad one as ``prefix + name``.
    A sequence field checks each element; None is always allowed where the type allows it."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
            continue
        rng = field_range(hints.get(f.name))
        if rng is None or value is None:
            continue
        for v in value if isinstance(value, list | tuple) else [value]:
            rng.check(prefix + f.name, v)
