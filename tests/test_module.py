"""module.py: the learning-rate schedule of a block's fit."""

from __future__ import annotations

import pytest

from hh_lightning.module import cosine_factor


@pytest.mark.parametrize("total,warmup,floor", [(4, 0, 1e-3), (32, 8, 1e-3), (100, 25, 0.1), (1, 0, 0.5)])
def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor(total, warmup, floor) -> None:
    factors = [cosine_factor(step, total, floor, warmup) for step in range(total + 1)]
    rising, decaying = factors[:warmup + 1], factors[warmup:]
    assert rising == pytest.approx([(step + 1) / (warmup + 1) for step in range(warmup)] + [1.0])
    assert all(b > a for a, b in zip(rising, rising[1:]))
    assert decaying[0] == 1.0 and decaying[-1] == pytest.approx(floor)
    assert all(b <= a for a, b in zip(decaying, decaying[1:]))
    assert cosine_factor(total + 10, total, floor, warmup) == pytest.approx(floor)  # clamped past the end


def test_no_warmup_is_the_plain_cosine() -> None:
    assert [cosine_factor(s, 10, 0.01) for s in range(11)] == [cosine_factor(s, 10, 0.01, 0) for s in range(11)]
    assert cosine_factor(5, 10, 0.0) == pytest.approx(0.5)
