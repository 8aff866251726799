"""The collapse alarm: fires exactly once after `patience` consecutive logged z_std below fraction / sqrt(dim)."""

import math

import pytest

from batchssl.collapse import CollapseAlarm


def test_threshold_is_a_fraction_of_the_healthy_level():
    alarm = CollapseAlarm(dim=2048)
    assert alarm.healthy == pytest.approx(1 / math.sqrt(2048))
    assert alarm.threshold == pytest.approx(0.1 / math.sqrt(2048))


def test_fires_once_after_patience_low_values():
    alarm = CollapseAlarm(dim=100, fraction=0.1, patience=3)  # threshold 0.01
    assert [alarm.update(v) for v in [0.1, 0.09, 0.005, 0.004]] == [False, False, False, False]
    assert alarm.update(0.003) is True  # third low value in a row
    assert [alarm.update(v) for v in [0.0, 0.0, 0.0, 0.0]] == [False] * 4  # exactly once
    assert alarm.fired


def test_a_healthy_value_resets_the_count():
    alarm = CollapseAlarm(dim=100, fraction=0.1, patience=3)
    assert not any(alarm.update(v) for v in [0.001, 0.001, 0.05, 0.001, 0.001, 0.02, 0.001, 0.001])
    assert alarm.update(0.001) is True


def test_threshold_value_itself_is_healthy_and_nan_is_low():
    alarm = CollapseAlarm(dim=4, fraction=0.5, patience=2)  # threshold 0.25
    assert not alarm.update(0.25) and not alarm.update(0.25)
    assert not alarm.update(float("nan"))
    assert alarm.update(float("nan"))


def test_healthy_run_never_fires():
    alarm = CollapseAlarm(dim=2048)
    assert not any(alarm.update(1 / math.sqrt(2048) * (0.5 + 0.01 * (i % 7))) for i in range(1000))


def test_state_round_trip():
    a = CollapseAlarm(dim=100, fraction=0.1, patience=3)
    a.update(0.0), a.update(0.0)
    b = CollapseAlarm(dim=100, fraction=0.1, patience=3)
    b.load_state_dict(a.state_dict())
    assert b.update(0.0) is True


def test_message_names_the_numbers():
    alarm = CollapseAlarm(dim=2048)
    text = alarm.message(1e-5)
    assert "collapse" in text and "sqrt(2048)" in text


@pytest.mark.parametrize("kwargs", [dict(dim=0), dict(dim=8, fraction=0.0), dict(dim=8, patience=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CollapseAlarm(**kwargs)
