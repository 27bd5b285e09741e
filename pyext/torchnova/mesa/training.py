"""MESA and SAF: the training side of "Sharpness-Aware Training for Free" (Du et al., NeurIPS 2022).

Both add ``weight · mesa_kl(student, teacher)`` (τ²·KL(teacher ‖ student), batch mean) to the task loss; they
differ in where the teacher's logits come from:

* ``MESA``: an exponential moving average of the model (timm's ``ModelEmaV2`` as the official code uses it):
  a copy kept in eval mode, updated after every optimizer step from step 0 with ``e ← decay·e + (1−decay)·m``
  over the parameters and floating-point buffers; integer buffers (BatchNorm's ``num_batches_tracked``) are
  copied — the official code averages and truncates them, which only makes the counter wrong.
* ``SAF``: the model's own logits for the same sample ``epochs_ago`` epochs before, kept in a bank indexed by
  the dataset index: a ring of ``epochs_ago + 1`` slots per sample; each step writes the detached current
  logits to slot ``epoch % (epochs_ago + 1)`` and reads slot ``(epoch − epochs_ago) % (epochs_ago + 1)``.

Schedules follow the official code: the loss is active iff ``start_epoch < epoch < end_epoch`` (strict on both
sides; ``end_epoch=None`` means no end) and is exactly 0 otherwise. The EMA update is not gated by the schedule.

Memory (``memory_estimate``): MESA costs one copy of the weights (ResNet-50: 25.6M fp32 = 97.5 MiB, the paper's
"98 MB"); SAF costs ``epochs_ago + 1`` logits per sample (ImageNet-1k, 1000 classes: the paper's 14.6 GB for 3
fp32 epochs; fp16 halves it; ``storage=<path>`` keeps it in a numpy memmap on disk).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .ops import mesa_kl


def _check_common(temperature: float, weight: float, start_epoch: int, end_epoch: int | None) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(weight, (int, float)) and weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not isinstance(start_epoch, int):
        raise TypeError(f"start_epoch must be an int, got {type(start_epoch).__name__}")
    if end_epoch is not None and not isinstance(end_epoch, int):
        raise TypeError(f"end_epoch must be an int or None, got {type(end_epoch).__name__}")


def _active(epoch: int, start_epoch: int, end_epoch: int | None) -> bool:
    return start_epoch < epoch and (end_epoch is None or epoch < end_epoch)


def _zero_loss(logits: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # mesa_kl's loss dtype
    return torch.zeros((), dtype=dtype, device=logits.device)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps; MESA must see the same parameters the optimizer updates."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


class MESA:
    """An EMA teacher and the MESA loss. Build it before wrapping the model in DDP or FSDP::

        mesa = torchnova.MESA(model, decay=0.9998, temperature=5.0, weight=0.8, start_epoch=5)
        model = DDP(model)                       # DDP: MESA reads the wrapped module's parameters
        for epoch in range(epochs):
            for x, y in loader:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + mesa.loss(logits, x, epoch=epoch)
                loss.backward(); optimizer.step(); optimizer.zero_grad()
                mesa.update()

    FSDP (the ``fully_shard`` API): pass the function that shards the model, ``MESA(model, shard=fn)``, then
    call ``fn(model)``; the teacher is copied from the unsharded model and sharded by ``fn`` the same way, so the
    EMA update runs on matching local shards and the teacher forward gathers its weights like the model does.
    FSDP modules cannot be deep-copied, so MESA raises if the model is already sharded.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        temperature: float = 5.0,
        weight: float = 0.8,
        start_epoch: int = 5,
        end_epoch: int | None = None,
        *,
        shard=None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        _check_common(temperature, weight, start_epoch, end_epoch)
        module = _unwrap(model)
        if next(module.parameters(), None) is None:
            raise ValueError("model must have parameters: an EMA teacher of a parameter-free model is the model")
        if _is_fsdp(module):
            raise ValueError(
                "model is already sharded by FSDP, which cannot be copied: build MESA(model, shard=fn) before "
                "calling fn(model) (the fully_shard API)"
            )
        self.decay, self.temperature, self.weight = float(decay), float(temperature), float(weight)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.model = module
        self.teacher = copy.deepcopy(module).eval().requires_grad_(False)
        if shard is not None:
            shard(self.teacher)
        self.num_updates = 0

    def _pairs(self):
        """(teacher, model) tensors in state order: floating ones to average, the others to copy."""
        teacher = [*self.teacher.parameters(), *self.teacher.buffers()]
        model = [*self.model.parameters(), *self.model.buffers()]
        if len(teacher) != len(model):
            raise RuntimeError(f"teacher has {len(teacher)} tensors but the model {len(model)}: was it modified?")
        floating = [(t, m) for t, m in zip(teacher, model) if t.is_floating_point()]
        others = [(t, m) for t, m in zip(teacher, model) if not t.is_floating_point()]
        return floating, others

    @torch.no_grad()
    def update(self) -> None:
        """e ← decay·e + (1 − decay)·m for parameters and float buffers (one foreach lerp); copy the others."""
        floating, others = self._pairs()
        if floating:
            teacher, model = zip(*floating)
            torch._foreach_lerp_(list(teacher), [m.detach() for m in model], 1.0 - self.decay)
        for t, m in others:
            t.copy_(m)
        self.num_updates += 1

    def active(self, epoch: int) -> bool:
        return _active(epoch, self.start_epoch, self.end_epoch)

    def loss(self, student_logits: torch.Tensor, *inputs, epoch: int, **kwargs) -> torch.Tensor:
        """weight · mesa_kl(student_logits, teacher(*inputs, **kwargs)); 0 outside the schedule.

        The teacher runs under ``no_grad`` and under whatever autocast the caller has entered."""
        if not self.active(epoch):
            return _zero_loss(student_logits)
        with torch.no_grad():
            teacher_logits = self.teacher(*inputs, **kwargs)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but student_logits "
                f"{tuple(student_logits.shape)}: pass the inputs that produced student_logits"
            )
        if teacher_logits.dtype != student_logits.dtype:  # e.g. the student's logits cast to fp32 after autocast
            teacher_logits = teacher_logits.to(student_logits.dtype)
        return self.weight * mesa_kl(student_logits, teacher_logits, temperature=self.temperature)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])


NEVER_WRITTEN = torch.iinfo(torch.int64).min


class SAF:
    """Logits from ``epochs_ago`` epochs before as the teacher; a bank of ``epochs_ago + 1`` slots per sample.

    ``loss(logits, indices, epoch)`` records ``logits.detach()`` for the samples ``indices`` (their dataset
    indices) and returns ``weight · mesa_kl(logits, bank[indices, epoch − epochs_ago])``. A sample whose slot was
    not written exactly ``epochs_ago`` epochs before (its first epochs, or an epoch it was not drawn) contributes
    no loss, and the batch mean is over the samples that have a teacher. The official code reads such slots
    anyway (zeros, i.e. a uniform teacher); skipping them is the deviation.

    Storage: ``"memory"`` (a CPU tensor) or a file path (a numpy memmap of shape (num_samples, slots, classes),
    created or overwritten; float16/float32 only, as numpy has no bfloat16). The bank lives on the host like the
    official code's; each step moves one batch of logits each way.

    Under DDP (torch.distributed initialized, world size > 1) every step all-gathers the batch's indices and
    logits, so every rank records every sample and the banks stay identical and complete even when a shuffling
    DistributedSampler hands a sample to another rank in a later epoch.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        epochs_ago: int = 3,
        temperature: float = 5.0,
        weight: float = 0.3,
        start_epoch: int = 5,
        dtype: torch.dtype = torch.float16,
        storage: str | Path = "memory",
        end_epoch: int | None = None,
    ):
        for name, value in (("num_samples", num_samples), ("num_classes", num_classes), ("epochs_ago", epochs_ago)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        _check_common(temperature, weight, start_epoch, end_epoch)
        self.num_samples, self.num_classes, self.epochs_ago = num_samples, num_classes, epochs_ago
        self.temperature, self.weight = float(temperature), float(weight)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.slots = epochs_ago + 1
        shape = (num_samples, self.slots, num_classes)
        if storage == "memory":
            self.bank = torch.zeros(shape, dtype=dtype)
        else:
            self.bank = _memmap_bank(Path(storage), shape, dtype)
        # The epoch each slot was written in (NEVER_WRITTEN: never, an epoch no loop reaches), so a stale or
        # empty slot is never read as a teacher.
        self.written_epoch = torch.full((num_samples, self.slots), NEVER_WRITTEN, dtype=torch.int64)

    def _check(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must have shape (batch, num_classes={self.num_classes}), got {shape}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must be an int64/int32 tensor of dataset indices, got {got}")
        if indices.shape != (logits.shape[0],):
            raise ValueError(
                f"indices must have shape ({logits.shape[0]},), one per row of logits, got {tuple(indices.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise ValueError(
                f"indices must be in [0, num_samples={self.num_samples}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )

    def active(self, epoch: int) -> bool:
        return _active(epoch, self.start_epoch, self.end_epoch)

    def loss(self, logits: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        self._check(logits, indices)
        host_indices = indices.detach().to("cpu", torch.int64)
        read_slot, write_slot = (epoch - self.epochs_ago) % self.slots, epoch % self.slots
        if self.active(epoch):
            teacher = self.bank[host_indices, read_slot].to(logits.device, logits.dtype, non_blocking=True)
            valid = (self.written_epoch[host_indices, read_slot] == epoch - self.epochs_ago).to(logits.device)
            result = self.weight * mesa_kl(logits, teacher, temperature=self.temperature, mask=valid)
        else:
            result = _zero_loss(logits)
        self.record(logits, host_indices, epoch)
        return result

    @torch.no_grad()
    def record(self, logits: torch.Tensor, indices: torch.Tensor, epoch: int) -> None:
        """Write the detached logits of ``indices`` to this epoch's slot (all ranks' batches under DDP)."""
        logits, indices = logits.detach(), indices.to(torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            logits, indices = _all_gather_rows(logits, indices.to(logits.device))
        slot = epoch % self.slots
        if self.bank.dtype == torch.float16:  # beyond ±65504 fp16 holds inf, and an inf teacher logit gives NaN
            limit = torch.finfo(torch.float16).max
            logits = logits.clamp(-limit, limit)
        self.bank[indices.cpu(), slot] = logits.to("cpu", self.bank.dtype)
        self.written_epoch[indices.cpu(), slot] = epoch

    def state_dict(self) -> dict:
        """Bank and bookkeeping (the bank is large: a memmap bank is saved by its file, not copied)."""
        return {"bank": self.bank, "written_epoch": self.written_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.bank.copy_(state["bank"])
        self.written_epoch.copy_(state["written_epoch"])


def _memmap_bank(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    try:
        import numpy as np
    except ImportError as exc:
        raise ValueError("storage=<path> needs numpy (pip install numpy); use storage='memory' without it") from exc
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if np_dtype is None:
        raise TypeError(f"a file-backed bank needs dtype float16/float32/float64 (numpy has no {dtype}), got {dtype}")
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
    return torch.from_numpy(array)  # shares the mapped memory: writes go to the file


def _all_gather_rows(logits: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (logits, indices), concatenated; batches may differ in size between ranks."""
    world = dist.get_world_size()
    size = torch.tensor([logits.shape[0]], device=logits.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded_logits = logits.new_zeros((longest, logits.shape[1]))
    padded_logits[: logits.shape[0]] = logits
    padded_indices = indices.new_zeros((longest,))
    padded_indices[: indices.shape[0]] = indices
    all_logits = [torch.empty_like(padded_logits) for _ in range(world)]
    all_indices = [torch.empty_like(padded_indices) for _ in range(world)]
    dist.all_gather(all_logits, padded_logits)
    dist.all_gather(all_indices, padded_indices)
    return (
        torch.cat([t[:n] for t, n in zip(all_logits, sizes)]),
        torch.cat([t[:n] for t, n in zip(all_indices, sizes)]),
    )


def memory_estimate(
    model: nn.Module | None = None,
    *,
    num_params: int | None = None,
    param_bytes: int = 4,
    num_samples: int,
    num_classes: int,
    epochs_ago: int = 3,
    bank_dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Extra memory of MESA (one copy of the weights) vs SAF (stored logits), in bytes.

    ``teacher_bytes``: the model's parameters and floating buffers (or ``num_params · param_bytes``).
    ``history_bytes``: ``epochs_ago`` epochs of logits, the paper's count (14.6 GB for ImageNet-1k, 3 fp32 epochs).
    ``bank_bytes``: what ``SAF`` allocates: the ring has ``epochs_ago + 1`` slots, the one being written included.
    """
    if (model is None) == (num_params is None):
        raise ValueError("pass exactly one of model and num_params")
    if model is not None:
        tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        teacher_bytes = sum(t.numel() * t.element_size() for t in tensors)
    else:
        teacher_bytes = num_params * param_bytes
    per_epoch = num_samples * num_classes * bank_dtype.itemsize
    return {
        "teacher_bytes": float(teacher_bytes),
        "history_bytes": float(per_epoch * epochs_ago),
        "bank_bytes": float(per_epoch * (epochs_ago + 1)),
    }
