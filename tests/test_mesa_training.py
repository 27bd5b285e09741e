"""MESA (EMA teacher) and SAF (logit bank) on one process: update rule, schedule, checkpoints, bank, errors."""

import copy

import pytest
import torch
from torch import nn

import torchnova
from torchnova.mesa import memory_estimate
from torchnova.mesa.reference import mesa_kl_rows_ref
from utils import assert_close


def small_model():
    # ReLU before BatchNorm: a Linear bias straight into a training-mode BatchNorm has an exactly zero gradient (BN
    # subtracts the batch mean), so whether SGD moves it would depend on the BLAS's rounding.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 5))


def train_step(model, optimizer, x, y, extra=None):
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y) + (extra(logits) if extra else 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return logits


def test_ema_update_matches_the_formula_and_copies_integer_buffers():
    model = small_model()
    mesa = torchnova.MESA(model, decay=0.9)
    before = copy.deepcopy(mesa.teacher.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_step(model, optimizer, torch.randn(16, 6), torch.randint(0, 5, (16,)))
    mesa.update()
    for name, value in mesa.teacher.state_dict().items():
        current = model.state_dict()[name]
        if value.is_floating_point():
            # Not the kernel table: the same fp32 formula evaluated two ways (the EMA's fused lerp vs mul + add)
            # differs by a rounding or two of values ~1, so a few fp32 ulps.
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * current, rtol=1e-6, atol=1e-7)
            assert not torch.equal(value, before[name]), name  # every float tensor moved (params and BN stats)
        else:
            assert torch.equal(value, current), name  # num_batches_tracked copied, not averaged
    assert mesa.num_updates == 1
    assert not mesa.teacher.training and not any(p.requires_grad for p in mesa.teacher.parameters())


def test_loss_schedule_strict_bounds_and_value():
    model = small_model()
    mesa = torchnova.MESA(model, decay=0.99, temperature=2.0, weight=0.5, start_epoch=2, end_epoch=5)
    x = torch.randn(7, 6)
    logits = model(x)
    for epoch in (0, 1, 2, 5, 6):
        zero = mesa.loss(logits, x, epoch=epoch)
        assert zero.item() == 0.0 and not zero.requires_grad
    loss = mesa.loss(logits, x, epoch=3)
    with torch.no_grad():
        teacher_logits = mesa.teacher(x)
    expected = 0.5 * mesa_kl_rows_ref(logits.double(), teacher_logits.double(), 2.0).mean()
    assert_close(loss, expected, torch.float32, "fwd", "MESA loss")
    loss.backward()
    assert all(p.grad is None for p in mesa.teacher.parameters())  # teacher gets no gradient
    assert model[0].weight.grad is not None


def test_teacher_runs_in_eval_mode_and_under_the_callers_autocast():
    model = small_model()
    mesa = torchnova.MESA(model, start_epoch=-1)
    x = torch.randn(9, 6)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = mesa.loss(logits.float(), x, epoch=0)  # teacher's bf16 logits are cast to the student's dtype
        with torch.no_grad():
            teacher_logits = mesa.teacher(x)
    assert logits.dtype == teacher_logits.dtype == torch.bfloat16  # the caller's autocast reached the teacher
    expected = mesa.weight * mesa_kl_rows_ref(logits.double(), teacher_logits.double(), mesa.temperature).mean()
    assert loss.dtype == torch.float32
    assert_close(loss, expected, torch.float32, "fwd", "autocast MESA loss")  # fp32 loss of exact bf16 inputs
    # Eval mode: dropout off and BN running stats, so two teacher calls agree exactly.
    with torch.no_grad():
        assert torch.equal(mesa.teacher(x), mesa.teacher(x))


def test_state_dict_round_trip_resumes_identically():
    model = small_model()
    mesa = torchnova.MESA(model, decay=0.8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        train_step(model, optimizer, torch.randn(8, 6), torch.randint(0, 5, (8,)))
        mesa.update()
    saved = copy.deepcopy(mesa.state_dict())
    restored = torchnova.MESA(small_model(), decay=0.5)
    restored.load_state_dict(saved)
    assert restored.decay == 0.8 and restored.num_updates == 3
    for a, b in zip(restored.teacher.state_dict().values(), mesa.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_ddp_wrapped_model_is_unwrapped():
    model = small_model()

    class FakeDDP(nn.parallel.DistributedDataParallel):  # no process group needed to test the unwrapping
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    mesa = torchnova.MESA(FakeDDP(model))
    assert mesa.model is model
    assert [n for n, _ in mesa.teacher.named_parameters()] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"decay": 1.0}, ValueError, "decay must be in \\(0, 1\\), got 1.0"),
        ({"decay": 0.0}, ValueError, "decay must be in"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0, got 0.0"),
        ({"weight": -1.0}, ValueError, "weight must be"),
        ({"start_epoch": 1.5}, TypeError, "start_epoch must be an int"),
    ],
)
def test_mesa_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        torchnova.MESA(small_model(), **kwargs)


def test_mesa_bad_model_and_mismatched_logits():
    with pytest.raises(ValueError, match="model must have parameters"):
        torchnova.MESA(nn.ReLU())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        torchnova.MESA(lambda x: x)
    model = small_model()
    mesa = torchnova.MESA(model, start_epoch=-1)
    with pytest.raises(ValueError, match=r"teacher logits have shape \(4, 5\) but student_logits \(4, 3\)"):
        mesa.loss(torch.randn(4, 3), torch.randn(4, 6), epoch=0)


# ---------------------------------------------------------------------------------------------------------
# SAF
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["memory", "file"])
def test_saf_reads_the_logits_of_epochs_ago(storage, tmp_path):
    num_samples, classes, epochs_ago = 10, 4, 2
    saf = torchnova.SAF(
        num_samples, classes, epochs_ago=epochs_ago, temperature=3.0, weight=0.5, start_epoch=1,
        dtype=torch.float32, storage="memory" if storage == "memory" else tmp_path / "bank.npy",
    )  # fmt: skip
    history = {}
    for epoch in range(6):
        perm = torch.randperm(num_samples)
        for batch in perm.split(4):
            logits = torch.randn(len(batch), classes, requires_grad=True)
            loss = saf.loss(logits, batch, epoch)
            past = [history.get((epoch - epochs_ago, int(i))) for i in batch]
            rows = [k for k, p in enumerate(past) if p is not None]
            if saf.active(epoch) and rows:
                teacher = torch.stack([past[k] for k in rows]).double()
                expected = 0.5 * mesa_kl_rows_ref(logits[rows].double(), teacher, 3.0).mean()
                assert_close(loss, expected, torch.float32, "fwd", "SAF loss")
                loss.backward()
                assert logits.grad is not None
            else:
                assert loss.item() == 0.0
            for k, i in enumerate(batch):
                history[(epoch, int(i))] = logits[k].detach().clone()
    if storage == "file":
        import numpy as np

        on_disk = np.load(tmp_path / "bank.npy", mmap_mode="r")
        assert on_disk.shape == (num_samples, epochs_ago + 1, classes)
        torch.testing.assert_close(torch.from_numpy(np.array(on_disk[3, 5 % 3])), history[(5, 3)])


def test_saf_skips_samples_whose_slot_is_stale():
    saf = torchnova.SAF(4, 3, epochs_ago=1, start_epoch=-1, dtype=torch.float32, weight=1.0)
    everything = torch.arange(4)
    assert saf.loss(torch.randn(4, 3), everything, epoch=0).item() == 0.0  # active, but no slot written yet
    # Epoch 1 sees only samples 0, 1; at epoch 2 samples 2, 3 have a slot from epoch 0: stale, not a teacher.
    saf.loss(torch.randn(2, 3), torch.tensor([0, 1]), epoch=1)
    logits = torch.randn(4, 3)
    loss = saf.loss(logits, everything, epoch=2)
    teacher = saf.bank[everything, 1].double()  # slot of epoch 1
    expected = mesa_kl_rows_ref(logits[:2].double(), teacher[:2], 5.0).mean()  # batch mean over the 2 valid rows
    assert_close(loss, expected, torch.float32, "fwd", "SAF loss")


def test_saf_fp16_bank_clamps_huge_logits_instead_of_storing_inf():
    saf = torchnova.SAF(2, 3, epochs_ago=1, start_epoch=-1, dtype=torch.float16)
    saf.loss(torch.tensor([[1e6, 0.0, -1e6], [1.0, 2.0, 3.0]]), torch.tensor([0, 1]), epoch=0)
    assert torch.isfinite(saf.bank).all()
    logits = torch.randn(2, 3, requires_grad=True)
    loss = saf.loss(logits, torch.tensor([0, 1]), epoch=1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_saf_bad_input():
    saf = torchnova.SAF(5, 3)
    with pytest.raises(ValueError, match=r"indices must be in \[0, num_samples=5\), got values in \[2, 5\]"):
        saf.loss(torch.randn(2, 3), torch.tensor([2, 5]), epoch=0)
    with pytest.raises(ValueError, match="indices must be an int64/int32 tensor"):
        saf.loss(torch.randn(2, 3), torch.tensor([0.0, 1.0]), epoch=0)
    with pytest.raises(ValueError, match=r"indices must have shape \(2,\)"):
        saf.loss(torch.randn(2, 3), torch.tensor([0, 1, 2]), epoch=0)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, num_classes=3\), got \(2, 4\)"):
        saf.loss(torch.randn(2, 4), torch.tensor([0, 1]), epoch=0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        torchnova.SAF(5, 0)
    with pytest.raises(ValueError, match="temperature must be"):
        torchnova.SAF(5, 3, temperature=-1.0)
    with pytest.raises(TypeError, match="numpy has no torch.bfloat16"):
        torchnova.SAF(5, 3, dtype=torch.bfloat16, storage="/tmp/never-created.npy")


def test_memory_estimate_reproduces_the_papers_figures():
    resnet50_params = 25_557_032
    imagenet_train = 1_281_167
    estimate = memory_estimate(num_params=resnet50_params, num_samples=imagenet_train, num_classes=1000, epochs_ago=3)
    # Paper: an EMA copy of ResNet-50 is ~98 MB; three epochs of fp32 ImageNet-1k logits ~14.6 GB (14,643 MB).
    assert estimate["teacher_bytes"] / 2**20 == pytest.approx(98, rel=0.01)
    assert estimate["history_bytes"] / 2**20 == pytest.approx(14_643, rel=0.002)
    assert estimate["bank_bytes"] == pytest.approx(estimate["history_bytes"] * 4 / 3)  # the ring's 4th slot
    fp16 = memory_estimate(num_params=1, num_samples=imagenet_train, num_classes=1000, bank_dtype=torch.float16)
    assert fp16["history_bytes"] == estimate["history_bytes"] / 2
    model = nn.Linear(10, 3)
    assert memory_estimate(model, num_samples=1, num_classes=3)["teacher_bytes"] == (30 + 3) * 4
    with pytest.raises(ValueError, match="exactly one of model and num_params"):
        memory_estimate(num_samples=1, num_classes=3)
