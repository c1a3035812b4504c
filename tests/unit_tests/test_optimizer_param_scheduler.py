"""OptimizerParamScheduler: learning rate and weight decay at given steps against the closed-form formulas."""

import math

import pytest
import torch

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

MAX_LR, MIN_LR, INIT_LR = 1.0e-3, 1.0e-4, 1.0e-5
WARMUP, DECAY = 10, 110


def make_optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a], "wd_mult": 1.0}, {"params": [b], "wd_mult": 0.0}], lr=0.0)


def make(style: str, **kwargs) -> OptimizerParamScheduler:
    settings = dict(init_lr=INIT_LR, max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP, lr_decay_steps=DECAY,
                    lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=DECAY, wd_incr_style="constant")
    settings.update(kwargs)
    return OptimizerParamScheduler(make_optimizer(), **settings)


def lr_at(scheduler: OptimizerParamScheduler, step: int) -> float:
    scheduler.step(step - scheduler.num_steps)
    lrs = {group["lr"] for group in scheduler.optimizer.param_groups}
    assert len(lrs) == 1
    return lrs.pop()


def expected_decay(style: str, step: int) -> float:
    """Closed forms after warmup: t is the fraction of the decay phase done."""
    t = (step - WARMUP) / (DECAY - WARMUP)
    if style == "linear":
        return MIN_LR + (MAX_LR - MIN_LR) * (1 - t)
    if style == "cosine":
        return MIN_LR + (MAX_LR - MIN_LR) * (1 + math.cos(math.pi * t)) / 2
    raise AssertionError(style)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_linear_warmup(style):
    scheduler = make(style)
    for step in (0, 1, 5, 10):
        assert lr_at(scheduler, step) == pytest.approx(INIT_LR + (MAX_LR - INIT_LR) * step / WARMUP, rel=1e-12)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_decay_styles(style):
    scheduler = make(style)
    for step in (11, 30, 60, 99, 110):
        assert lr_at(scheduler, step) == pytest.approx(expected_decay(style, step), rel=1e-12)
    assert lr_at(scheduler, 111) == MIN_LR
    assert lr_at(scheduler, 10_000) == MIN_LR


def test_constant_stays_at_max_lr():
    scheduler = make("constant")
    assert [lr_at(scheduler, s) for s in (11, 110, 500)] == [MAX_LR] * 3


def test_inverse_square_root():
    scheduler = make("inverse-square-root")
    for step in (11, 40, 90, 110):
        assert lr_at(scheduler, step) == pytest.approx(max(MIN_LR, MAX_LR * math.sqrt(WARMUP / step)), rel=1e-12)
    assert lr_at(scheduler, 111) == MIN_LR
    # without a floor the 1/sqrt shape shows past the point where min_lr would bind
    scheduler = make("inverse-square-root", min_lr=0.0, lr_decay_steps=10_000)
    assert lr_at(scheduler, 4000) == pytest.approx(MAX_LR * math.sqrt(10 / 4000), rel=1e-12)


@pytest.mark.parametrize("wsd_style", ["exponential", "linear", "cosine", "minus_sqrt"])
def test_wsd(wsd_style):
    wsd_steps = 40
    scheduler = make("WSD", wsd_decay_steps=wsd_steps, lr_wsd_decay_style=wsd_style)
    anneal_start = DECAY - wsd_steps
    for step in (11, 50, anneal_start):
        assert lr_at(scheduler, step) == MAX_LR  # stable phase
    closed_forms = {
        "exponential": lambda r: 2 * 0.5**r - 1,
        "linear": lambda r: 1 - r,
        "cosine": lambda r: (1 + math.cos(math.pi * r)) / 2,
        "minus_sqrt": lambda r: 1 - math.sqrt(r),
    }
    for step in (71, 80, 95, 110):
        r = (step - anneal_start) / wsd_steps
        assert lr_at(scheduler, step) == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) * closed_forms[wsd_style](r),
                                                       rel=1e-12, abs=1e-15)
    assert lr_at(scheduler, 110) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr_at(scheduler, 200) == MIN_LR


def test_wsd_defaults_to_exponential():
    scheduler = make("WSD", wsd_decay_steps=40)
    assert lr_at(scheduler, 90) == pytest.approx(MIN_LR + (MAX_LR - MIN_LR) * (2 * 0.5**0.5 - 1), rel=1e-12)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_increment(style):
    scheduler = make("linear", start_wd=0.01, end_wd=0.1, wd_incr_steps=50, wd_incr_style=style)
    for step in (0, 10, 25, 50, 51, 300):
        scheduler.step(step - scheduler.num_steps)
        t = min(step / 50, 1.0)
        coeff = t if style == "linear" else (1 + math.cos(math.pi * (1 - t))) / 2
        assert scheduler.get_wd() == pytest.approx(0.01 + 0.09 * coeff, rel=1e-12)
        decayed, exempt = scheduler.optimizer.param_groups
        assert decayed["weight_decay"] == pytest.approx(scheduler.get_wd(), rel=1e-12)
        assert exempt["weight_decay"] == 0.0


def test_steps_accumulate_and_sample_increments():
    scheduler = make("cosine")
    for _ in range(6):
        scheduler.step(5)  # e.g. 5 samples per iteration
    assert scheduler.num_steps == 30
    assert scheduler.get_lr() == pytest.approx(expected_decay("cosine", 30), rel=1e-12)


def test_group_overrides():
    scheduler = make("linear")
    group = {"max_lr": 2e-3, "min_lr": 0.0, "start_wd": 0.0, "end_wd": 0.0}
    scheduler.step(60)
    assert scheduler.get_lr(group) == pytest.approx(2e-3 * (1 - 50 / 100), rel=1e-12)
    assert scheduler.get_wd(group) == 0.0


def test_state_dict_round_trip_resumes_schedule():
    first = make("cosine")
    first.step(42)
    state = first.state_dict()
    second = make("linear", max_lr=5.0, min_lr=0.0)  # the checkpoint's settings win, as in Megatron
    second.load_state_dict(state)
    assert second.num_steps == 42 and second.lr_decay_style == "cosine"
    assert [g["lr"] for g in second.optimizer.param_groups] == [g["lr"] for g in first.optimizer.param_groups]
    first.step(7)
    second.step(7)
    assert second.get_lr() == first.get_lr()


def test_load_megatron_legacy_keys():
    scheduler = make("linear")
    scheduler.load_state_dict({"start_lr": MAX_LR, "min_lr": MIN_LR, "warmup_iter": WARMUP, "end_iter": DECAY,
                               "decay_style": "linear", "num_iters": 60})
    assert scheduler.num_steps == 60
    assert scheduler.get_lr() == pytest.approx(expected_decay("linear", 60), rel=1e-12)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(min_lr=2e-3), "min_lr <= max_lr"),
    (dict(init_lr=2e-3), "init_lr <= max_lr"),
    (dict(lr_warmup_steps=110), "must be < lr_decay_steps"),
    (dict(lr_decay_style="step"), "lr_decay_style must be one of"),
    (dict(lr_decay_style="WSD"), "needs wsd_decay_steps"),
    (dict(lr_decay_style="WSD", wsd_decay_steps=5, lr_wsd_decay_style="square"), "lr_wsd_decay_style"),
    (dict(start_wd=0.0, end_wd=0.1), "start_wd == end_wd"),
    (dict(start_wd=0.2, end_wd=0.1, wd_incr_style="linear"), "start_wd <= end_wd"),
])
def test_rejects_inconsistent_settings(kwargs, message):
    style = kwargs.pop("lr_decay_style", "linear")
    with pytest.raises(ValueError, match=message):
        make(style, **kwargs)


def test_no_decay_horizon_starts_at_max_lr():
    scheduler = make("cosine", lr_warmup_steps=0, lr_decay_steps=None, wd_incr_steps=0)
    assert scheduler.get_lr() == MAX_LR and scheduler.get_wd() == 0.1
