"""Sizes in bytes, as the command line reads and prints them (torch-free: the CLI parses options with them)."""

from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', '123' (bytes). ValueError if malformed."""
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "K": 1000, "M": 1000**2, "G": 1000**3,
             "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    value = float(number)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * factor)

