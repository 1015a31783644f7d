"""The reference's integer-list syntax (``--seeds 0-63,100``)."""

from __future__ import annotations


def parse_int_list(text: str, max_count: int | None = None) -> list[int]:
    """Parse ``'0-63,100'`` into ``[0, ..., 63, 100]`` (the reference's ``--seeds`` syntax); more than
    ``max_count`` values is a ``ValueError`` (checked before anything is allocated)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"empty range {part!r}")
            if max_count is not None and len(out) + (b - a + 1) > max_count:
                raise ValueError(f"more than {max_count} values")
            out.extend(range(a, b + 1))
        else:
            out.append(int(part))
    return out
