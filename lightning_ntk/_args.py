"""Argument validators shared by the public functions and the monitors.

Each returns the value, converted (``int``, ``float``), or raises with a message that names
the owner (a function or monitor), the argument, what it must be and what it got:
``"NTKMonitor: k must be an integer >= 1, got 0"``. ``bool`` is never accepted as a number.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Optional, TypeVar

import numpy as np

T = TypeVar("T")


def _fail(owner: str, name: str, requirement: str, value: Any, error: type = ValueError, hint: str = "") -> None:
    prefix = f"{owner}: " if owner else ""
    raise error(f"{prefix}{name} must be {requirement}, got {value!r}{'; ' + hint if hint else ''}")


def integer(value: Any, name: str, owner: str = "", *, minimum: Optional[int] = None,
            maximum: Optional[int] = None, optional: bool = False, hint: str = "") -> Any:
    """An ``int`` (NumPy integers accepted) within ``[minimum, maximum]``; None when ``optional``."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            requirement = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            requirement = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        else:
            requirement = "an integer"
        _fail(owner, name, ("None or " if optional else "") + requirement, value, hint=hint)
    return int(value)


def positive_int(value: Any, name: str, owner: str = "", *, optional: bool = False, hint: str = "") -> Any:
    """An integer >= 1 (None when ``optional``)."""
    return integer(value, name, owner, minimum=1, optional=optional, hint=hint)


def number(value: Any, name: str, owner: str = "", *, minimum: Optional[float] = None,
           maximum: Optional[float] = None, exclusive: bool = False, optional: bool = False,
           hint: str = "") -> Any:
    """A finite real number within ``[minimum, maximum]`` (open bounds when ``exclusive``)."""
    if value is None and optional:
        return None
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(value))
    if ok and minimum is not None:
        ok = value > minimum if exclusive else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if exclusive else value <= maximum
    if not ok:
        lo, hi = ("(", ")") if exclusive else ("[", "]")
        if minimum is not None and maximum is not None:
            requirement = f"a number in {lo}{minimum}, {maximum}{hi}"
        elif minimum is not None:
            requirement = f"a finite number {'>' if exclusive else '>='} {minimum}"
        elif maximum is not None:
            requirement = f"a finite number {'<' if exclusive else '<='} {maximum}"
        else:
            requirement = "a finite number"
        _fail(owner, name, ("None or " if optional else "") + requirement, value, hint=hint)
    return float(value)


def positive(value: Any, name: str, owner: str = "", *, optional: bool = False, hint: str = "") -> Any:
    """A finite number > 0."""
    return number(value, name, owner, minimum=0, exclusive=True, optional=optional, hint=hint)


def fraction(value: Any, name: str, owner: str = "", *, optional: bool = False, hint: str = "") -> Any:
    """A number in the open interval (0, 1)."""
    return number(value, name, owner, minimum=0, maximum=1, exclusive=True, optional=optional, hint=hint)


def one_of(value: T, name: str, choices: Iterable[Any], owner: str = "", *, hint: str = "") -> T:
    """One of ``choices`` (compared with ``==``)."""
    options = list(choices)
    if value not in options:
        _fail(owner, name, "one of " + ", ".join(repr(c) for c in options), value, hint=hint)
    return value


def function(value: Any, name: str, owner: str = "", *, signature: str = "", optional: bool = True) -> Any:
    """A callable (None when ``optional``); ``signature`` describes what it is called with."""
    if value is None and optional:
        return None
    if not callable(value):
        what = "a callable" + (f" {signature}" if signature else "")
        _fail(owner, name, ("None or " if optional else "") + what, value, error=TypeError)
    return value


def text(value: Any, name: str, owner: str = "", *, forbid: str = "", optional: bool = False,
         hint: str = "") -> Any:
    """A non-empty ``str`` holding none of the characters of ``forbid`` (None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or any(c in value for c in forbid):
        requirement = "a non-empty string" + (f" without {' or '.join(map(repr, forbid))}" if forbid else "")
        _fail(owner, name, ("None or " if optional else "") + requirement, value, hint=hint)
    return value


@contextlib.contextmanager
def named(owner: str) -> Iterator[None]:
    """Re-raise a ``TypeError``/``ValueError`` from inside with ``owner`` named first (for checks
    of the functional core, e.g. a schedule or a budget given to a monitor)."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(f"{owner}:"):
            raise
        raise type(exc)(f"{owner}: {exc}") from None
