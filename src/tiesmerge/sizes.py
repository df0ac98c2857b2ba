"""Sizes and the defaults written in sizes, in one place: parsed once, printed one way.

A size is a number of bytes, written with a unit: ``2GiB`` (binary, 2^30) or ``5GB``
(decimal, 10^9), as people write memory and file sizes. Memory budgets default to
``DEFAULT_MEMORY_BUDGET`` and output shards to ``DEFAULT_SHARD_SIZE``.

>>> parse_size("2GiB"), parse_size("5GB"), format_size(3 << 20)
(2147483648, 5000000000, '3.00 MiB')
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_MEMORY_BUDGET", "DEFAULT_SHARD_SIZE", "OUTPUT_FORMATS", "parse_size", "format_size"]

DEFAULT_MEMORY_BUDGET = "2GiB"  # working memory for tensor chunks
DEFAULT_SHARD_SIZE = "5GB"  # largest output shard (Hugging Face's own default)
OUTPUT_FORMATS = ("model", "adapter")  # a full HF model, or a merged PEFT adapter (adapters in)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "tib": 1 << 40, "pib": 1 << 50}


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648, '5GB' -> 5000000000, 1024 -> 1024; ValueError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        try:
            value = float(text)
        except OverflowError:  # 10**400: past any float (hostile pass 28, N3)
            raise ValueError(f"size must be a positive, finite number of bytes: an integer of {len(str(abs(text))):,} "
                             "digits is past any size") from None
    else:
        s = str(text).strip().lower().replace(" ", "")
        number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(number):]
        if unit not in _UNITS and number:
            raise ValueError(f"not a size: {text!r}: unknown unit {unit!r} (B, KB, MB, GB, TB, PB or KiB, MiB, GiB, "
                             "TiB, PiB; e.g. 512MiB, 2GiB, 5GB)")
        try:
            value = float(number) * _UNITS[unit]
        except (KeyError, ValueError):
            raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GiB, 5GB)") from None
        if math.isfinite(value) and 1 <= value < 1024 and not value.is_integer():  # '1.5B', '0.0015KB' were said as
            raise ValueError(f"not a size: {text!r} is {value:g} bytes: a count of bytes is a whole number")  # 1 B
            # (hp66a c25, hp67a c66); past a KiB a fraction of a byte is rounded away
    # checked after truncation to whole bytes: '0.5' would otherwise become a budget of 0
    if math.isfinite(value) and 0 < value < 1:  # '0.5B': positive, but no whole byte (hostile pass 27, N2)
        raise ValueError(f"size must be at least 1 byte: {text!r} is {value:g} bytes")
    if not math.isfinite(value) or int(value) <= 0:
        raise ValueError(f"size must be a positive, finite number of bytes: {text!r}")
    return int(text) if isinstance(text, int) else int(value)


def budget_in_use(given: object) -> int | None:
    """The memory budget a call runs with, in bytes (the default where none was given); None where ``given`` is no
    size (its own check says so)."""
    try:
        return parse_size(DEFAULT_MEMORY_BUDGET if given is None else given)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def format_size(n: float, *, up: bool = False) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'. ``up``: rounded up, not to the nearest (a size the reader may type
    back as a minimum, such as a memory budget that must be at least this, then suffices)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if up else round(n):.0f} {unit}"
            return f"{math.ceil(n * 100) / 100 if up else n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# How the caller sets the shard size, for the hint when a shard is larger than a file may be: the
# Python API's keyword by default; the command line sets the flag of the command that runs (merge has
# --shard-size; stats, tune, adapt have none). A plain global: shards are written on another thread.
shard_size_option: str | None = "shard_size="
