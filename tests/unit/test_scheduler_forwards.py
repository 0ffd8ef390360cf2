"""The step's token budget (cluster.scheduler.forwards), without a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.scheduler.forwards import split_forwards


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=20), st.one_of(st.none(), st.integers(1, 120)))
def test_groups_keep_order_and_respect_the_budget(tokens, budget):
    groups = split_forwards(tokens, budget)
    assert [i for g in groups for i in g] == list(range(len(tokens)))  # every window once, in order
    if budget is None:
        assert len(groups) == min(1, len(tokens))
        return
    for g in groups:
        assert sum(tokens[i] for i in g) <= budget or len(g) == 1  # a window is never split
    for a, b in zip(groups, groups[1:]):  # greedy: the next window did not fit the previous forward
        assert sum(tokens[i] for i in a) + tokens[b[0]] > budget


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_forward_tokens"):
        split_forwards([1], 0)
