"""How one engine step's windows become DiT forwards: the query-token budget (plain Python).

A window is never split; consecutive windows share a forward while their query tokens stay
within ``max_forward_tokens`` (``engine.max_forward_tokens``; bounds a step's activation
memory however many jobs are active). Without a budget every window is in one forward.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_forwards(tokens: Sequence[int], budget: int | None) -> list[list[int]]:
    """Indices of ``tokens`` (query tokens per window, in order) grouped into forwards.

    Each group is a run of consecutive windows whose sum is at most ``budget``, except a
    window larger than the budget alone; ``budget`` None: one group with every window.

    Raises:
        ValueError: ``budget`` is not positive.
    """
    if budget is not None and budget <= 0:
        raise ValueError(f"max_forward_tokens must be positive, got {budget}")
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(tokens):
        if not groups or (budget is not None and used + n > budget):
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups
