"""Megatron's ``--split`` string: train/valid/test fractions and the contiguous document range of each split."""

from __future__ import annotations


def parse_split(split: str) -> list[float]:
    """Parse ``"969,30,1"`` (or ``"969/30/1"``, ``"98,2"``) into three fractions summing to 1.

    Missing trailing parts are 0. Raises ``ValueError`` for negative, non-numeric, all-zero or more than 3 parts.
    """
    text = split.strip()
    parts = [p.strip() for p in text.replace("/", ",").split(",")] if text else []
    if not parts or len(parts) > 3:
        raise ValueError(f"--split must have 1 to 3 comma-separated weights, got {split!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split weights must be numbers, got {split!r}") from None
    if any(v < 0 or v != v or v == float("inf") for v in values):
        raise ValueError(f"--split weights must be finite and non-negative, got {split!r}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split weights must not all be zero, got {split!r}")
    values += [0.0] * (3 - len(values))
    return [v / total for v in values]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Cut ``num_documents`` into 3 consecutive ``(start, stop)`` ranges (train, valid, test) by ``split``.

    Each boundary is the rounded cumulative fraction, as Megatron does; the rounding surplus or deficit is taken off
    every boundary so that the last one ends exactly at ``num_documents``.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + round(fraction * float(num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [max(0, b - excess) for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]
