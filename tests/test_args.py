"""The shared argument validators of ``lightning_ntk._args``: what each accepts, what it
refuses, and that a refusal names the owner, the argument, the requirement and the value."""
import math
import re

import numpy as np
import pytest

from lightning_ntk._args import fraction, function, integer, number, one_of, positive, positive_int, text


# ------------------------------------------------------------------------------ integer
@pytest.mark.parametrize("value", [0, 7, -3, np.int64(5), np.int8(-2), np.uint16(9), 10**30])
def test_integer_accepts_ints_and_numpy_ints(value):
    out = integer(value, "n", "Owner")
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, 2.5, float("nan"), float("inf"), "3", None,
                                   [1], np.array(3)])
def test_integer_refuses_non_integers(value):
    with pytest.raises(ValueError, match=r"^Owner: n must be an integer, got "):
        integer(value, "n", "Owner")


def test_integer_bounds():
    assert integer(3, "k", minimum=3, maximum=3) == 3
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\], got 6$"):
        integer(6, "k", minimum=1, maximum=5)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\], got 0$"):
        integer(0, "k", minimum=1, maximum=5)
    with pytest.raises(ValueError, match=r"k must be an integer >= 2, got 1$"):
        integer(1, "k", minimum=2)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 0$"):
        integer(0, "k", minimum=1)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\], got True$"):
        integer(True, "k", minimum=1, maximum=5)  # in range as a number, still refused
    assert integer(-(10**9), "k", maximum=0) == -(10**9)
    with pytest.raises(ValueError, match=r"got 1$"):
        integer(1, "k", maximum=0)


def test_integer_optional():
    assert integer(None, "seed", optional=True) is None
    with pytest.raises(ValueError, match=r"seed must be an integer, got None$"):
        integer(None, "seed")
    with pytest.raises(ValueError, match=r"seed must be None or an integer >= 0, got -1$"):
        integer(-1, "seed", minimum=0, optional=True)


# ------------------------------------------------------------------------- positive_int
def test_positive_int():
    assert positive_int(1, "n") == 1 and positive_int(np.int32(4), "n") == 4
    assert positive_int(None, "n", optional=True) is None
    for bad in (0, -1, True, 1.0, None, "1"):
        with pytest.raises(ValueError, match=r"^EveryNSteps: n must be a positive integer, got "):
            positive_int(bad, "n", "EveryNSteps")
    with pytest.raises(ValueError, match=r"^Probe: size must be None or a positive integer, got 0; None takes all$"):
        positive_int(0, "size", "Probe", optional=True, hint="None takes all")


# ------------------------------------------------------------------------------- number
@pytest.mark.parametrize("value", [0, -2, 0.5, 1e300, np.float32(0.25), np.float64(-1.5), np.int64(3)])
def test_number_accepts_finite_reals(value):
    out = number(value, "x", "f")
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value", [True, False, np.bool_(False), float("nan"), float("inf"), -math.inf,
                                   np.float64("nan"), "0.5", None, 1j, [0.5], np.array([0.5])])
def test_number_refuses_bools_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^f: x must be a finite number, got "):
        number(value, "x", "f")


def test_number_bounds_closed_and_open():
    assert number(0, "eps", minimum=0) == 0.0 and number(1, "p", minimum=0, maximum=1) == 1.0
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1e-09$"):
        number(-1e-9, "eps", minimum=0)
    with pytest.raises(ValueError, match=r"t must be a finite number <= 2, got 3$"):
        number(3, "t", maximum=2)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got 1.5$"):
        number(1.5, "p", minimum=0, maximum=1)
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\), got 1$"):
        number(1, "p", minimum=0, maximum=1, exclusive=True)
    with pytest.raises(ValueError, match=r"t must be a finite number < 2, got 2$"):
        number(2, "t", maximum=2, exclusive=True)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got inf$"):
        number(math.inf, "eps", minimum=0)  # above the minimum but not finite


def test_number_optional():
    assert number(None, "timeout", optional=True) is None
    with pytest.raises(ValueError, match=r"timeout must be None or a finite number > 0, got 0$"):
        number(0, "timeout", minimum=0, exclusive=True, optional=True)


# ----------------------------------------------------------------------------- positive
def test_positive():
    assert positive(1e-300, "budget") == 1e-300 and positive(np.float32(2), "budget") == 2.0
    assert positive(None, "budget", optional=True) is None
    for bad in (0, 0.0, -0.1, math.inf, math.nan, True, "5%", None):
        with pytest.raises(ValueError, match=r"^Governor: budget must be a finite number > 0, got .*; e\.g\. 0\.05$"):
            positive(bad, "budget", "Governor", hint="e.g. 0.05")


# ----------------------------------------------------------------------------- fraction
def test_fraction():
    assert fraction(0.5, "test_fraction") == 0.5 and fraction(np.float64(1e-9), "test_fraction") == 1e-9
    assert fraction(None, "test_fraction", optional=True) is None
    for bad in (0, 1, 0.0, 1.0, -0.5, 2, math.nan, math.inf, True, False, "0.5", None):
        with pytest.raises(ValueError, match=r"^kd: test_fraction must be a number in \(0, 1\), got "):
            fraction(bad, "test_fraction", "kd")


# ------------------------------------------------------------------------------- one_of
def test_one_of():
    assert one_of("dot", "method", ("dot", "max_overlap")) == "dot"
    assert one_of(2, "k", range(3)) == 2
    with pytest.raises(ValueError, match=r"^align_signs: method must be one of 'dot', 'max_overlap', got 'nearest'$"):
        one_of("nearest", "method", ("dot", "max_overlap"), "align_signs")
    with pytest.raises(ValueError, match=r"source must be one of 'train', 'val', got None; pass tensors$"):
        one_of(None, "source", ["train", "val"], hint="pass tensors")
    with pytest.raises(ValueError, match=r"got 'Dot'"):  # exact match, no case folding
        one_of("Dot", "method", ("dot",))


# ----------------------------------------------------------------------------- function
def test_function():
    f = lambda model, x: x  # noqa: E731
    assert function(f, "forward_fn") is f and function(len, "forward_fn") is len
    assert function(None, "forward_fn") is None  # optional by default
    with pytest.raises(TypeError, match=r"^codes: forward_fn must be None or a callable \(model, x\) -> outputs, "
                                        r"got 3$"):
        function(3, "forward_fn", "codes", signature="(model, x) -> outputs")
    with pytest.raises(TypeError, match=r"^loss_fn must be a callable, got None$"):
        function(None, "loss_fn", optional=False)
    with pytest.raises(TypeError, match=r"loss_fn must be a callable, got 'mse'"):
        function("mse", "loss_fn", optional=False)


# --------------------------------------------------------------------------------- text
def test_text():
    assert text("train_256", "name", forbid="/") == "train_256"
    assert text(None, "name", optional=True) is None
    for bad in ("", "a/b", 3, None, b"x"):
        with pytest.raises(ValueError, match=r"^Probe: name must be a non-empty string without '/', got "):
            text(bad, "name", "Probe", forbid="/")
    with pytest.raises(ValueError, match=r"key must be None or a non-empty string, got ''$"):
        text("", "key", optional=True)
    with pytest.raises(ValueError, match=r"without '/' or ':'"):
        text("a:b", "name", forbid="/:")


# ------------------------------------------------------------------- messages in general
@pytest.mark.parametrize("call", [
    lambda: integer(-4, "k", "NTKMonitor", minimum=0),
    lambda: positive_int(-4, "k", "NTKMonitor"),
    lambda: number(-4, "k", "NTKMonitor", minimum=0),
    lambda: positive(-4, "k", "NTKMonitor"),
    lambda: fraction(-4, "k", "NTKMonitor"),
    lambda: one_of(-4, "k", (1, 2), "NTKMonitor"),
    lambda: text(-4, "k", "NTKMonitor"),
])
def test_messages_name_owner_argument_and_value(call):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert re.match(r"NTKMonitor: k must be .+, got -4$", message), message


def test_without_owner_there_is_no_prefix():
    with pytest.raises(ValueError) as info:
        positive_int(0, "n")
    assert str(info.value) == "n must be a positive integer, got 0"
