"""Dynamic-sparsity schedules (Eq. 8, linear ablation) and rank growth (Eq. 9)."""

import pytest

from losa.errors import ConfigError
from losa.schedule import SCHEDULES, mean_rank_at, sparsity_at


def test_cubic_schedule_by_hand_for_t5_s07():
    # S_t = 0.7 (1 - (1 - t/5)^3): (1 - t/5)^3 = 0.512, 0.216, 0.064, 0.008, 0
    expected = [0.7 * 0.488, 0.7 * 0.784, 0.7 * 0.936, 0.7 * 0.992, 0.7]
    got = [sparsity_at(t, 5, 0.7) for t in range(1, 6)]
    assert got == pytest.approx(expected, abs=1e-15)
    assert got == pytest.approx([0.3416, 0.5488, 0.6552, 0.6944, 0.7], abs=1e-15)
    assert got[-1] == 0.7  # the last step reaches the final sparsity exactly


def test_linear_schedule():
    got = [sparsity_at(t, 5, 0.7, kind="linear") for t in range(1, 6)]
    assert got == pytest.approx([0.14, 0.28, 0.42, 0.56, 0.7], abs=1e-15)
    assert got[-1] == 0.7


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("total_steps, final", [(1, 0.5), (3, 0.6), (10, 0.9)])
def test_schedules_increase_to_the_final_sparsity(kind, total_steps, final):
    values = [sparsity_at(t, total_steps, final, kind) for t in range(1, total_steps + 1)]
    assert values == sorted(values) and all(0 < v <= final for v in values)
    assert values[-1] == final


def test_cubic_front_loads_pruning():
    assert all(sparsity_at(t, 5, 0.7) > sparsity_at(t, 5, 0.7, "linear") for t in range(1, 5))


def test_mean_rank_grows_by_one_per_step():
    assert [mean_rank_at(t) for t in range(1, 6)] == [6, 7, 8, 9, 10]
    assert mean_rank_at(3, r0=2) == 4


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 5, 0.7), "step"),
        ((6, 5, 0.7), "step"),
        ((1.5, 5, 0.7), "step"),
        ((1, 0, 0.7), "dynamic steps"),
        ((1, 5, 1.0), "final sparsity"),
        ((1, 5, -0.1), "final sparsity"),
    ],
)
def test_bad_schedule_inputs(args, match):
    with pytest.raises(ConfigError, match=match):
        sparsity_at(*args)


def test_bad_schedule_kind_and_rank_inputs():
    with pytest.raises(ConfigError, match="unknown sparsity schedule"):
        sparsity_at(1, 5, 0.7, kind="exponential")
    with pytest.raises(ConfigError, match="step"):
        mean_rank_at(0)
    with pytest.raises(ConfigError, match="r0"):
        mean_rank_at(1, r0=0)
