"""The training loop's schedule (da2ext.training.lr_schedule): linear warmup, then one cosine."""
import io
import math

import pytest
import torch

from da2ext.training.lr_schedule import WarmupCosine, warmup_cosine_scheduler


def _rates(scheduler, optimizer, steps):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _optimizer(lr=0.1):
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=lr)


def test_warmup_ramps_linearly_then_decays_along_a_cosine_to_zero():
    optimizer = _optimizer(0.1)
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=20, warmup_fraction=0.2)  # 4 warmup steps
    rates = _rates(scheduler, optimizer, 20)
    assert rates[:4] == pytest.approx([0.1 * k / 5.0 for k in (1, 2, 3, 4)])
    assert rates[4] == pytest.approx(0.1)  # the peak, where the cosine starts
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 16.0)) for s in range(16)]
    assert rates[4:] == pytest.approx(cosine)
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_is_torchs_cosine_annealing():
    ours, theirs = _optimizer(), _optimizer()
    mine = warmup_cosine_scheduler(ours, total_steps=12, warmup_fraction=0.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=12)
    assert _rates(mine, ours, 12) == pytest.approx(_rates(reference, theirs, 12))


def test_every_group_keeps_its_own_rate_under_the_same_factor():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1e-3}])
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=10, warmup_fraction=0.1)
    for _ in range(3):
        ratio = optimizer.param_groups[0]["lr"] / optimizer.param_groups[1]["lr"]
        assert ratio == pytest.approx(100.0)
        optimizer.step()
        scheduler.step()


def test_the_schedule_resumes_from_a_weights_only_checkpoint():
    optimizer = _optimizer()
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=10, warmup_fraction=0.3)
    _rates(scheduler, optimizer, 4)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_optimizer = _optimizer()
    resumed = warmup_cosine_scheduler(resumed_optimizer, total_steps=10, warmup_fraction=0.3)
    resumed.load_state_dict(state)
    resumed_optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    assert _rates(resumed, resumed_optimizer, 6) == pytest.approx(_rates(scheduler, optimizer, 6))


def test_a_one_step_run_has_no_warmup():
    optimizer = _optimizer(0.1)
    warmup_cosine_scheduler(optimizer, total_steps=1, warmup_fraction=0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_a_bad_warmup_fraction_is_refused_by_name(fraction):
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        warmup_cosine_scheduler(_optimizer(), total_steps=10, warmup_fraction=fraction)


def test_bad_step_counts_are_refused_by_name():
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        WarmupCosine(0, 0)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        WarmupCosine(5, 5)


def test_the_cli_takes_a_warmup_fraction_and_refuses_a_bad_one(capsys):
    from da2ext.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["train", "--data", "d"]).warmup == pytest.approx(0.1)
    assert parser.parse_args(["train", "--data", "d", "--warmup", "0"]).warmup == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--warmup", "1.5"])
    assert "--warmup: expected a number in [0, 1)" in capsys.readouterr().err
