"""A knob: a config field written once, with what the CLI and the validator need to know about it (flags, help,
choices, bounds). `knob(...)` makes the dataclass field; `validate_knobs(obj)` checks every knob of a config
section and raises ValueError naming the knob; the server builds its flags from `Knob` (semipd_server.cli)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Knob:
    help: str
    flags: tuple[str, ...] = ()  # CLI spellings, first one canonical; () = no flag (Engine keyword only)
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    exclusive: bool = False  # the bounds are exclusive (a fraction in (0, 1), a float > 0)
    invert: bool = False  # a bool whose flag sets it False (--disable-radix-cache -> enable_radix_cache=False)
    group: str = ""  # the CLI group it is listed under


def knob(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
         choices: tuple[str, ...] = (), minimum: float | None = None, maximum: float | None = None,
         exclusive: bool = False, invert: bool = False, group: str = "", factory: Any = None) -> Any:
    meta = {"knob": Knob(help, flags, choices, minimum, maximum, exclusive, invert, group)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def knobs_of(section: Any) -> list[tuple[str, Knob, Any]]:
    """(name, Knob, default) of every knob field of a config section class or instance."""
    out = []
    for f in dataclasses.fields(section):
        k = f.metadata.get("knob")
        if k is not None:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f.name, k, default))
    return out


def validate_knobs(section: Any) -> None:
    """Raise ValueError (TypeError for a wrong type) naming the first knob whose value is out of bounds."""
    for name, k, default in knobs_of(section):
        v = getattr(section, name)
        if v is None:
            if default is not None:
                raise ValueError(f"{name} must be set (default {default!r}), got None")
            continue
        if isinstance(default, bool) or isinstance(v, bool):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
            continue
        check_value(name, k, v)


def check_value(name: str, k: Knob, v: Any) -> None:
    """Raise ValueError naming `name` when v is not one of the knob's choices or outside its bounds."""
    if k.choices:
        if v not in k.choices:
            raise ValueError(f"{name} must be one of {', '.join(k.choices)}; got {v!r}")
        return
    if k.minimum is None and k.maximum is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    lo, hi = k.minimum, k.maximum
    too_low = lo is not None and (v <= lo if k.exclusive else v < lo)
    too_high = hi is not None and (v >= hi if k.exclusive else v > hi)
    if too_low or too_high:
        op = ">" if k.exclusive else ">="
        if hi is None:
            raise ValueError(f"{name} must be {op} {lo:g}, got {v}")
        if lo is None:
            raise ValueError(f"{name} must be {'<' if k.exclusive else '<='} {hi:g}, got {v}")
        bracket = ("(", ")") if k.exclusive else ("[", "]")
        raise ValueError(f"{name} must be in {bracket[0]}{lo:g}, {hi:g}{bracket[1]}, got {v}")
