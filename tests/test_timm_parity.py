"""torchnova.MESA's teacher against timm's ModelEmaV2, the EMA the official MESA code keeps its teacher with.

A timm ResNet with BatchNorm (pretrained=False, no download) trains a few SGD steps with the MESA loss; after
each optimizer step both EMAs update with the same decay. Parameters and floating-point buffers (BN running
mean/var) must agree within float32 rounding (MESA uses one foreach lerp, timm ``decay*e + (1-decay)*m``: a few
ulps apart after several steps); the teachers' outputs too. The one deliberate difference is the integer
buffer ``num_batches_tracked`` (docs/mesa.md): MESA copies it, timm averages it in float and truncates it back
into the int64 buffer, so timm's stays 0 for the first 1/(1 - decay) steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchnova

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchnova[integrations])")
from timm.utils import ModelEmaV2  # noqa: E402

DECAY = 0.9  # far from 1 so that a few steps move the teachers well away from the initial weights
STEPS = 6


def _train(model_name: str):
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    mesa = torchnova.MESA(model, decay=DECAY, temperature=5.0, weight=0.8, start_epoch=-1)
    ema = ModelEmaV2(model, decay=DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(STEPS):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        logits = model(x)
        loss = F.cross_entropy(logits, y) + mesa.loss(logits, x, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mesa.update()
        ema.update(model)
    return model, mesa, ema, initial


@pytest.mark.parametrize("model_name", ["resnet10t"])
def test_mesa_teacher_equals_timm_model_ema_v2(model_name):
    model, mesa, ema, initial = _train(model_name)
    ours, timms, now = mesa.teacher.state_dict(), ema.module.state_dict(), model.state_dict()
    assert list(ours) == list(timms)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    compared = moved = 0
    for name, expected in timms.items():
        actual = ours[name]
        if name.endswith("num_batches_tracked"):  # the deliberate difference (module docstring)
            assert actual.item() == now[name].item() == STEPS, name
            assert expected.item() == 0, name
            continue
        assert actual.is_floating_point(), name
        # float32 rounding: a few ulps of the value (or of the EMA's terms, for values near 0)
        size = expected.abs() + DECAY * initial[name].abs() + (1 - DECAY) * now[name].abs()
        diff = (actual - expected).abs()
        assert (diff <= 8 * torch.finfo(torch.float32).eps * size + 1e-30).all(), (
            f"{name}: max |MESA - ModelEmaV2| {diff.max().item():.3e}"
        )
        compared += 1
        moved += int(not torch.equal(expected, initial[name]))
    assert compared > 0 and moved > compared // 2, "the EMA barely moved: the test would not notice a difference"
    mesa.teacher.eval()
    ema.module.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mesa.teacher(x), ema.module(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mesa.teacher(x), model.eval()(x), rtol=1e-3, atol=1e-3)  # the teacher lags
