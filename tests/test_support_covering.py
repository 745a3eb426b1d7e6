"""support.covering_pairs: the reduced parameter matrices of the kernel tests cover every pair of values."""

from __future__ import annotations

import itertools

import pytest
from support import covering_pairs


@pytest.mark.parametrize(
    "axes",
    [
        [range(2, 9), [True, False], ["f16", "f32", "pow2", "e5m2"], [0, 4, 8]],
        [[2, 3, 4, 6, 8], [True, False], [32, 16, 64, 12], ["gfni", "no-gfni"]],
        [[1, 3, 8, 12, 40, 520], [32, 16, 64, 12], ["5a", "5s", "6s", "7a"]],
        [[1, 2, 3]],
        [[1], [2, 3], [4]],
        [range(5), range(5), range(5), range(5), range(5)],
    ],
)
def test_every_pair_of_values_appears(axes: list) -> None:
    rows = covering_pairs(*axes)
    assert all(len(row) == len(axes) for row in rows)
    assert len(set(rows)) == len(rows), "no row twice"
    for i, j in itertools.combinations(range(len(axes)), 2):
        assert {(row[i], row[j]) for row in rows} == set(itertools.product(axes[i], axes[j])), (i, j)
    if len(axes) == 1:
        assert [row[0] for row in rows] == list(axes[0])
    full = 1
    for axis in axes:
        full *= len(list(axis))
    assert len(rows) <= full
    assert covering_pairs(*axes) == rows, "deterministic"


def test_sizes_near_the_lower_bound() -> None:
    """About |largest axis| * |second largest| rows (the least any pairwise set can have)."""
    assert len(covering_pairs(range(2, 9), [True, False], range(4), [0, 4, 8])) <= 7 * 4 + 4
    assert len(covering_pairs([2, 3, 4, 6, 8], [True, False], range(4), range(2))) <= 5 * 4 + 3
