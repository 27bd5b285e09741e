"""``python -m benchmarks --tune``: measure the GPU backends of every op and write the order ``auto`` follows.

For each (op, dtype, shape bucket) of ``TUNE_GRID`` it times forward+backward of every GPU backend (``cuda``,
``triton``) that can run the inputs, and records {backend: median ms} in the tune cache
(``torchnova._tuning``, keyed by GPU name, op, dtype and bucket). ``backend="auto"`` then follows the measured
order on this GPU for every shape in a tuned bucket; untuned buckets keep the roofline model's order.
``TORCHNOVA_BACKEND`` and ``backend=`` still override both. The timer is injectable so tests run it on CPU with a
fake clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

import torchnova
from torchnova import _backend, _roofline, _tuning

GPU_BACKENDS = ("cuda", "triton")

# One representative shape per bucket users hit (the papers' shapes, docs/performance.md).
TUNE_GRID: dict[str, list[dict]] = {
    "temporal_attention": [dict(B=2, T=T, S=4096, H=8, D=D) for T in (8, 16, 32, 64) for D in (40, 64)],
    "spatial_attention": [dict(B=2, T=16, S=S, H=8, D=D) for S in (256, 1024, 4096) for D in (40, 64)],
    "cogvideo_attention": [
        dict(B=1, H=48, D=64, text_len=64, frames=5, grid=20, channel=c, attention=a)
        for c, a in (("base", "full"), ("plus", "full"), ("plus", "window"))
    ],
    "mesa_kl": [dict(rows=8192, C=C) for C in (1000, 32000, 128256)],
}


def make_case(op: str, shape: dict, dtype: torch.dtype, device: torch.device):
    """(inputs as ``_backend.select`` sees them, fwd+bwd callable for a backend name)."""
    if op in ("temporal_attention", "spatial_attention"):
        B, T, S, H, D = (shape[k] for k in "BTSHD")
        qkv = torch.randn(B, T, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
        fn = torchnova.temporal_attention_qkvpacked if op == "temporal_attention" else torchnova.spatial_attention_qkvpacked
        q = qkv[:, :, :, 0]
        return {"q": q, "k": q, "v": q}, lambda b: fn(qkv, backend=b).sum().backward()
    if op == "cogvideo_attention":
        g = shape["grid"]
        L = shape["text_len"] + shape["frames"] * g * g
        q, k, v = (torch.randn(shape["B"], L, shape["H"], shape["D"], device=device, dtype=dtype,
                               requires_grad=True) for _ in range(3))  # fmt: skip
        kw = dict(text_len=shape["text_len"], frames=shape["frames"], grid=g, channel=shape["channel"],
                  attention=shape["attention"])  # fmt: skip
        inputs = dict(x=q, head_dim=shape["D"], text_len=kw["text_len"], frames=kw["frames"], grid=(g, g),
                      channel=kw["channel"], attention=kw["attention"], window=10)  # fmt: skip
        return inputs, lambda b: torchnova.cogvideo_attention(q, k, v, backend=b, **kw).sum().backward()
    if op == "mesa_kl":
        z = torch.randn(shape["rows"], shape["C"], device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(shape["rows"], shape["C"], device=device, dtype=dtype)
        return {"student_logits": z, "teacher_logits": t}, lambda b: torchnova.mesa_kl(z, t, backend=b).backward()
    raise ValueError(f"no tune cases for op {op!r}")


def default_timer(fn: Callable[[], object], device: torch.device) -> float:
    from .harness import measure_time

    return measure_time(fn, device, rep_ms=50.0).p50_ms


def tune(
    device: torch.device,
    ops: list[str],
    dtypes: list[torch.dtype],
    *,
    gpu_name: str | None = None,
    timer: Callable[[Callable[[], object], torch.device], float] = default_timer,
    backends: tuple[str, ...] = GPU_BACKENDS,
    path: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path | None:
    """Time every runnable backend per (op, dtype, bucket) and merge the results into the tune cache."""
    gpu = gpu_name or _roofline.device_name(_roofline.device_index(device))
    results: dict[str, dict[str, float]] = {}
    for op in ops:
        for shape in TUNE_GRID.get(op, []):
            for dtype in dtypes:
                inputs, run = make_case(op, shape, dtype, device)
                work = _roofline.workload(op, **inputs)
                times = {}
                for name in backends:
                    if name not in _backend.backends_for(op):
                        continue
                    why = _backend.reasons(op, name, **inputs)
                    if why:
                        log(f"  {op} {shape} {_tuning.dtype_name(dtype)}: {name} skipped ({'; '.join(why)})")
                        continue
                    times[name] = timer(lambda n=name: run(n), device)
                if times:
                    key = _tuning.entry_key(gpu, op, dtype, work.bucket)
                    log(f"  {key}: " + ", ".join(f"{b} {t:.3f} ms" for b, t in sorted(times.items(), key=lambda x: x[1])))
                    results[key] = times
    if not results:
        log("tune: nothing measured (no GPU backend could run)")
        return None
    written = _tuning.record(results, path)
    log(f"tune: wrote {len(results)} entries to {written}")
    return written
