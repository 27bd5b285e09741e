"""MESA / SAF training overhead: a whole training step with and without the regularizer, and the EMA update.

``mesa_step`` (mode fwd only: each call is one full training step, its backward included): the CNN of
examples/train_mesa.py on batches of 8×8 digits, SGD. Providers: ``plain-step`` (the baseline: forward,
cross-entropy, backward, optimizer step), ``torchnova-mesa-step`` (+ teacher forward under no_grad, fused
mesa_kl, EMA update) and ``torchnova-saf-step`` (+ bank read/write, fused mesa_kl). Their "speedup" is
plain / regularized, so 0.80x means the regularizer costs 25% more time per step.

``ema_update`` (mode fwd only): the teacher update e ← d·e + (1−d)·m over every parameter and float buffer.
``torchnova-foreach`` is ``MESA.update`` (one multi-tensor lerp); the baseline ``python-loop`` is the usual
``for e, m in zip(...): e.mul_(d).add_(m, alpha=1-d)``. Models: the example's CNN, and a 48-layer MLP with
LayerNorms (~200 tensors, 12.6M parameters) where per-tensor launch overhead matters. GB/s counts reading the
teacher and the model and writing the teacher: 3 · 4 bytes per parameter.

Run: ``python -m benchmarks --ops mesa_step,ema_update``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import torchnova

from .harness import Case, Inputs, OpBenchmark, Provider

NUM_CLASSES = 10


def digits_cnn() -> nn.Module:
    """The model of examples/train_mesa.py (kept in sync by hand: the example is a script, not a module)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, NUM_CLASSES),
    )  # fmt: skip


def deep_mlp(width: int = 512, depth: int = 48) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------------
# mesa_step
# ---------------------------------------------------------------------------------------------------------


def step_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    batch = shape["batch"]
    return {
        "x": torch.randn(batch, 1, 8, 8, device=device, dtype=dtype),
        "y": torch.randint(0, NUM_CLASSES, (batch,), device=device),
        "indices": torch.randperm(shape["samples"], device=device)[:batch],
        "samples": torch.tensor(shape["samples"]),
    }


def _make_step(regularizer: str):
    def make(inputs: Inputs):
        torch.manual_seed(0)
        x, y, indices = inputs["x"], inputs["y"], inputs["indices"]
        model = digits_cnn().to(x.device, x.dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        mesa = torchnova.MESA(model, decay=0.95, start_epoch=-1) if regularizer == "mesa" else None
        saf = (
            torchnova.SAF(int(inputs["samples"]), NUM_CLASSES, epochs_ago=1, start_epoch=-1, dtype=torch.float16)
            if regularizer == "saf"
            else None
        )
        epoch = [0]

        def step() -> torch.Tensor:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            if mesa is not None:
                loss = loss + mesa.loss(logits, x, epoch=0)
            if saf is not None:
                epoch[0] += 1  # every call a new epoch: the teacher slot is always the previous call's logits
                loss = loss + saf.loss(logits, indices, epoch[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if mesa is not None:
                mesa.update()
            return loss.detach()

        return step

    return make


def mesa_step_benchmark() -> OpBenchmark:
    shapes = [{"batch": 64, "samples": 1347}, {"batch": 256, "samples": 1347}]
    return OpBenchmark(
        name="mesa_step",
        make_inputs=step_inputs,
        providers=[
            Provider("plain-step", True, _make_step("none")),
            Provider("torchnova-mesa-step", False, _make_step("mesa")),
            Provider("torchnova-saf-step", False, _make_step("saf")),
        ],
        shapes=shapes,
        quick_shapes=shapes[:1],
        cuda_dtypes=(torch.float32,),
        modes=("fwd",),
    )


# ---------------------------------------------------------------------------------------------------------
# ema_update
# ---------------------------------------------------------------------------------------------------------

def _model_for(shape: dict[str, int]) -> nn.Module:
    return digits_cnn() if "digits_cnn" in shape else deep_mlp(shape["width"], shape["mlp_depth"])


def ema_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    return {"model": _model_for(shape).to(device, dtype)}


def _float_state(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]


def _make_foreach(inputs: Inputs):
    mesa = torchnova.MESA(inputs["model"], decay=0.999)

    def update() -> None:
        mesa.update()

    return update


def _make_python_loop(inputs: Inputs):
    model = inputs["model"]
    teacher = torchnova.MESA(model, decay=0.999).teacher
    pairs = list(zip(_float_state(teacher), _float_state(model)))
    decay = 0.999

    @torch.no_grad()
    def update() -> None:
        for e, m in pairs:
            e.mul_(decay).add_(m, alpha=1 - decay)

    return update


def ema_bytes(case: Case) -> int:
    model = _model_for(case.shape)
    return 3 * sum(t.numel() for t in _float_state(model)) * case.dtype.itemsize


def ema_benchmark() -> OpBenchmark:
    shapes = [{"digits_cnn": 1}, {"mlp_depth": 48, "width": 512}]
    return OpBenchmark(
        name="ema_update",
        make_inputs=ema_inputs,
        providers=[
            Provider("python-loop", True, _make_python_loop),
            Provider("torchnova-foreach", False, _make_foreach),
        ],
        shapes=shapes,
        quick_shapes=shapes,
        cuda_dtypes=(torch.float32,),
        bytes_moved=ema_bytes,
        modes=("fwd",),
    )


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--ops", "mesa_step,ema_update", *sys.argv[1:]]))
