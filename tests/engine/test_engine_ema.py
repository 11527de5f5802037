"""EMA weights match the hand-computed decay average."""

from __future__ import annotations

import pytest
import torch

from monai_diffusion.engine.ema import build_ema


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.register_buffer("stat", torch.zeros(2))


def _set(model: Net, value: float) -> None:
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.fill_(value)


def test_ema_matches_hand_computed_average():
    decay = 0.9
    model = Net()
    ema = build_ema(model, decay)
    assert ema.module is not model and not any(p.requires_grad for p in ema.parameters())

    values = [1.0, 2.0, 4.0, -3.0]
    expected = None
    for value in values:
        _set(model, value)
        ema.update_parameters(model)
        # AveragedModel copies the weights on the first update, then averages.
        expected = value if expected is None else decay * expected + (1 - decay) * value

    for t in (*ema.module.parameters(), *ema.module.buffers()):  # buffers too (use_buffers=True)
        assert torch.allclose(t, torch.full_like(t, expected), atol=1e-6)
    assert int(ema.n_averaged) == len(values)
    # the live model is untouched
    assert torch.equal(model.linear.weight, torch.full((2, 2), values[-1]))


def test_ema_state_dict_round_trip():
    model = Net()
    ema = build_ema(model, 0.5)
    _set(model, 2.0)
    ema.update_parameters(model)
    other = build_ema(Net(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.linear.weight, ema.module.linear.weight)
    assert int(other.n_averaged) == 1


def test_bad_decay():
    with pytest.raises(ValueError, match="ema_decay"):
        build_ema(Net(), 1.0)
