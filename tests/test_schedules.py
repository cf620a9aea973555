"""The automated LR (Algorithm 1, Sec. 4.2) on synthetic validation-accuracy sequences."""
import pytest

from autolora.schedules import AutoLR, StepLR


def _run(ra0, seq, interval=4, lr=0.01):
    s = AutoLR(lr=lr, interval=interval)
    s.start(ra0)
    return s, [s.observe(e, ra) for e, ra in enumerate(seq)]


def test_neither_condition_when_accuracy_keeps_rising():
    s, ds = _run(0.10, [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert not any(d.halve for d in ds) and s.lr == 0.01


def test_condition1_fires_when_rises_are_too_few():
    # rises in 2 of 4 epochs (< 0.75 * 4 = 3), best still improves -> only condition 1
    s, ds = _run(0.10, [0.2, 0.15, 0.3, 0.25])
    assert [d.halve for d in ds] == [False, False, False, True]
    assert ds[3].reason == "condition 1" and ds[3].rollback and s.lr == 0.005


def test_three_of_four_rises_is_enough():
    s, ds = _run(0.10, [0.2, 0.3, 0.25, 0.35])
    assert not ds[3].halve


def test_condition2_fires_when_best_and_lr_unchanged():
    # window 1: steady rises (no halving). window 2: 3 of 4 rises relative to the window start, yet the best
    # (0.5, epoch 3) is never beaten -> condition 2 only.
    s, ds = _run(0.10, [0.2, 0.3, 0.4, 0.5, 0.1, 0.2, 0.3, 0.45])
    assert not ds[3].halve
    assert ds[7].halve and ds[7].reason == "condition 2"


def test_condition2_needs_unchanged_lr():
    # halved at the first check (condition 1); at the second check the best has not improved, but the LR
    # changed at the previous check, so condition 2 does not apply; rises are enough for condition 1.
    s, ds = _run(0.5, [0.4, 0.3, 0.2, 0.1, 0.2, 0.3, 0.4, 0.45])
    assert ds[3].halve and ds[3].reason.startswith("condition 1")
    assert not ds[7].halve


def test_rollback_resets_window_start_to_best():
    s, ds = _run(0.5, [0.6, 0.4, 0.3, 0.2])
    assert ds[3].halve
    assert s.history[4] == 0.6  # the weights rolled back to are the best ones


def test_stops_below_min_lr():
    s = AutoLR(lr=0.01, interval=1, min_lr=1e-5)
    s.start(0.5)
    stops = []
    for e in range(20):
        d = s.observe(e, 0.1)  # never improves: halves at every check
        stops.append(d.stop)
        if d.stop:
            break
    assert s.lr < 1e-5 and stops[-1] and not any(stops[:-1])
    assert len(stops) == 10  # 0.01 / 2**10 < 1e-5 <= 0.01 / 2**9


def test_state_roundtrip():
    s, _ = _run(0.1, [0.2, 0.1, 0.3])
    t = AutoLR()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_step_lr_paper_milestones():
    s = StepLR(0.01, [30, 50])
    assert [s.lr_at(e) for e in (0, 29, 30, 49, 50, 59)] == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])
