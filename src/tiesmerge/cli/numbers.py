"""Number flags as argparse types: ASCII digits only, and a number past float's range said as such, not taken as 0
or an infinity (argparse prints only "invalid float value")."""

from __future__ import annotations

import argparse


def float_flag(text: str) -> float:
    """A float flag's value; a nonzero number that reads as 0 (1e-400) is refused, not taken as 0."""
    from ..limits import OutOfFloatRange, parse_float

    try:
        return parse_float(text)
    except OutOfFloatRange as exc:  # argparse would print only "invalid float value"
        raise argparse.ArgumentTypeError(str(exc)) from None


float_flag.__name__ = "float"  # argparse names the type in "invalid float value: 'x'"


def int_flag(text: str) -> int:
    """An int flag's value in ASCII digits (int() reads 1_0 as 10 and Arabic-Indic digits: typos, hp71b c38)."""
    from ..limits import NotPlainDigits, parse_int

    try:
        return parse_int(text)
    except NotPlainDigits as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


int_flag.__name__ = "int"
