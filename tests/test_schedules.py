import pytest

from pipeline.train.schedules import EpochSchedule


def rates(schedule, epochs):
    return [float(schedule.rate_at_epoch(epoch)) for epoch in epochs]


def test_constant_is_the_original():
    assert rates(EpochSchedule("constant", 0.005, 450, 100), [0, 50, 99.9]) == pytest.approx([0.005] * 3)


def test_onecycle_warms_up_then_decays_to_the_final_fraction():
    schedule = EpochSchedule("onecycle", 0.4, 10, 10, warmup_epochs=2, final_fraction=0.1)
    assert rates(schedule, [0, 1, 2, 6, 10]) == pytest.approx([0.0, 0.2, 0.4, 0.22, 0.04], abs=1e-6)


def test_cosine_and_step():
    cosine = EpochSchedule("cosine", 1.0, 10, 11, warmup_epochs=1)
    assert rates(cosine, [1, 6, 11]) == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
    step = EpochSchedule("step", 0.1, 10, 10, step_epochs=[3, 6], gamma=0.1)
    assert rates(step, [0, 2.9, 3, 6, 9]) == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001], abs=1e-7)


def test_step_calls_use_the_step_counter():
    # Resuming restores optimizer.iterations, so the rate at a step must depend on nothing else.
    schedule = EpochSchedule("onecycle", 0.4, 10, 10, warmup_epochs=2)
    assert float(schedule(55)) == pytest.approx(float(schedule.rate_at_epoch(5.55)))
