"""Compile every Triton kernel of torchnova, with every launch configuration its launcher can pick, for five GPU
targets, on a machine without a GPU; fail on any configuration that needs more shared memory than its target has.

    PYTHONPATH=pyext python scripts/compile_check_triton.py            # fast (CI): shared memory only
    PYTHONPATH=pyext python scripts/compile_check_triton.py --full     # + LLVM + ptxas: registers and spills
    options: --arch 80,86,89,90,120  --family spatial,temporal,dual_channel,mesa  --jobs N  --report FILE

Targets and their opt-in shared memory per block (the limit a launcher reads from
torch.cuda.get_device_properties(dev).shared_memory_per_block_optin): sm_80 (A100) 166,912 B, sm_86 (RTX 30xx,
A10, A40) and sm_89 (RTX 40xx, L4, L40) 101,376 B, sm_90 (H100/H200) 232,448 B, sm_120 (RTX 50xx) 101,376 B.

For each target the launchers' pure configuration functions (spatial_config, temporal_config, the dual-channel
_config, mesa's _pick_config) are called with that target's limit, for every kernel, dtype (fp32 / fp16 / bf16),
head-dim (and T) bucket and mode; each configuration they return is compiled with triton.compile's own stages
(ASTSource, GPUTarget('cuda', cc, 32)). A configuration for which they return None is one the op's reasons
exclude (auto moves on to another backend): it is listed as "excluded", not compiled.

Fast mode (the default, CI): runs the front end and TTGIR, then Triton's shared-memory allocation pass, which
yields the exact ``shared`` of the compiled kernel (the figure the launch checks against the device) without
LLVM or ptxas (about 0.3-0.8 s a kernel instead of 1-40 s). It compiles every dtype, head-dim / T bucket and
target, with one mode per kernel: the heaviest (all of bias, segments, causal, bias gradient for the temporal
kernels; plus / window / interpolation for the dual-channel ones) and the largest tiles (long sequences);
shorter sequences only shrink tiles. sm_80, sm_86, sm_89 and sm_120 share the mma v2 layouts and gave the same
shared memory for every configuration (triton 3.8 and 3.9), so a configuration two of them pick is compiled once
and checked against each limit (--every-target compiles it for each): 765 configurations, 317 compiles, a few
minutes on 2 cores with --jobs 2.
Full mode (--full): every mode and sequence-length bucket, through ptxas (the one shipped in the triton wheel);
also reports registers per thread and spills (the per-thread local memory of the cubin: what the driver reports
as n_spills) from cuobjdump -res-usage. Long (tens of minutes to hours on 2 cores).
--measure prints, per candidate configuration of the configuration tables, the most shared memory any target
needs in any mode (the ``shared`` figures of those tables).

Exit status 1 if a kernel fails to compile or a picked configuration needs more shared memory than its target
has. Spills are reported, not failed on (see docs/triton_configs.md for the ones over 1 KB).
Tested with triton 3.8; the compiler internals used (make_backend, add_stages, the shared-memory pass) are
looked up defensively, and the fast mode falls back to a full compile where they differ.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "pyext"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from torchnova import _backend  # noqa: E402
from torchnova.dual_channel import triton_kernels as dtk  # noqa: E402
from torchnova.mesa import triton_kernels as mtk  # noqa: E402
from torchnova.spacetime import triton_kernels as stk  # noqa: E402

TARGETS = {
    80: _backend.SHARED_MEMORY_SM80,
    86: _backend.SHARED_MEMORY_SM86,
    89: _backend.SHARED_MEMORY_SM86,
    90: _backend.SHARED_MEMORY_SM90,
    120: _backend.SHARED_MEMORY_SM86,
}
_MMA_V2_TARGETS = (80, 86, 89, 120)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FAMILIES = ("spatial", "temporal", "dual_channel", "mesa")
_POINTER_TYPES = {  # pointer arguments whose element type is not the inputs' dtype
    "lse_ptr": "*fp32", "delta_ptr": "*fp32", "bias_ptr": "*fp32", "seg_ptr": "*i64", "dbias_ws_ptr": "*fp32",
    "pad_ptr": "*u8", "list_ptr": "*i32", "count_ptr": "*i32", "d_alpha_partial_ptr": "*fp32",
    "alpha_logit_ptr": "*fp32", "loss_ptr": "*fp32", "grad_rows_ptr": "*fp32", "cos_ptr": "*fp32",
    "sin_ptr": "*fp32",
}  # fmt: skip
_FLOAT_SCALARS = ("scale", "qk_scale", "tau", "inv_tau")


@dataclasses.dataclass
class Case:
    family: str
    kernel: object  # the @triton.jit function
    dtype: str
    label: str  # bucket / mode / configuration, for the report
    constexprs: dict
    num_warps: int
    num_stages: int
    arch: int
    candidate: tuple | None = None  # the table entry this case compiles (--measure)

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclasses.dataclass
class Excluded:
    family: str
    kernel: str
    dtype: str
    label: str
    arch: int


# -------------------------------------------------------------------------------------------------------------
# The cases: what each launcher can pick, per target
# -------------------------------------------------------------------------------------------------------------


def spatial_cases(arch: int, full: bool, measure: bool):
    limit = TARGETS[arch]
    kernels = {"fwd": stk._spatial_fwd_kernel, "dq": stk._spatial_bwd_dq_kernel, "dkdv": stk._spatial_bwd_dkdv_kernel}
    seq_buckets = (16, 32, 64, 128) if full else (4096,)
    for dtype, torch_dtype in DTYPES.items():
        ieee = torch_dtype == torch.float32
        for name, kernel in kernels.items():
            for d_bucket, candidates in stk._SPATIAL_CANDIDATES[(name, ieee)].items():
                const = dict(PROBLEMS_ON_AXIS0=False, IEEE=ieee, D_PAD=d_bucket)
                if measure:
                    for c in candidates:
                        yield Case("spatial", kernel, dtype, f"D_PAD={d_bucket} {c.block_m}x{c.block_n}",
                                   dict(const, BLOCK_M=c.block_m, BLOCK_N=c.block_n), c.num_warps, c.num_stages,
                                   arch, candidate=("spatial", name, ieee, d_bucket, c))  # fmt: skip
                    continue
                seen = set()
                for S in seq_buckets:
                    cfg = stk.spatial_config(name, S, d_bucket, torch_dtype, limit)
                    if cfg is None:
                        yield Excluded("spatial", kernel.__name__, dtype, f"D_PAD={d_bucket}", arch)
                        break
                    if cfg in seen:
                        continue
                    seen.add(cfg)
                    for axis0 in (False, True) if full else (False,):
                        yield Case("spatial", kernel, dtype,
                                   f"D_PAD={d_bucket} S>={min(S, 128)} {cfg.block_m}x{cfg.block_n}"
                                   + (" problems-on-axis-0" if axis0 else ""),
                                   dict(const, PROBLEMS_ON_AXIS0=axis0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                                   cfg.num_warps, cfg.num_stages, arch)  # fmt: skip


def temporal_cases(arch: int, full: bool, measure: bool):
    limit = TARGETS[arch]
    t_buckets, d_buckets = (16, 32, 64), (16, 32, 64, 128, 256)
    for dtype, torch_dtype in DTYPES.items():
        ieee = torch_dtype == torch.float32
        for name, kernel in (("fwd", stk._temporal_fwd_kernel), ("bwd", stk._temporal_bwd_kernel)):
            flags = ("HAS_BIAS", "HAS_SEG", "CAUSAL") + (("BIAS_GRAD",) if name == "bwd" else ())
            if full:
                modes = [dict(zip(flags, bits)) for bits in _bit_tuples(len(flags))]
                if name == "bwd":  # a bias gradient needs a bias
                    modes = [m for m in modes if m["HAS_BIAS"] or not m["BIAS_GRAD"]]
            else:
                modes = [dict.fromkeys(flags, True)]
            for t_pad in t_buckets:
                fitting = []
                for d_pad in d_buckets:
                    cfg = stk.temporal_config(name, t_pad, d_pad, torch_dtype, limit)
                    if cfg is None:
                        yield Excluded("temporal", kernel.__name__, dtype, f"T_PAD={t_pad} D_PAD={d_pad}", arch)
                    else:
                        fitting.append(cfg)
                if not (full or measure):
                    fitting = fitting[-1:]  # the largest tiles that fit: shared memory grows with both pads
                if measure:  # every bucket, fitting or not: the figures temporal_shared_bytes bounds
                    fitting = [stk.temporal_config(name, t_pad, d, torch_dtype, 1 << 30) for d in d_buckets]
                for cfg in fitting:
                    mode_list = [dict(m, ROTARY=False, INTERLEAVED=False) for m in modes]
                    # rotary (temporal_attention(..., rotary=...)): its own configuration, or excluded by the reasons
                    rotary_cfg = stk.temporal_config(name, cfg.t_pad, cfg.d_pad, torch_dtype, limit, rotary=True)
                    if not measure and rotary_cfg is None:
                        yield Excluded("temporal", kernel.__name__, dtype, f"T_PAD={cfg.t_pad} D_PAD={cfg.d_pad} "
                                       "rotary", arch)  # fmt: skip
                    elif not measure:
                        mode_list += [dict(modes[-1], ROTARY=True, INTERLEAVED=i) for i in (False, True)]
                    for mode in mode_list:
                        mode_label = ",".join(k.lower() for k, v in mode.items() if v) or "plain"
                        yield Case("temporal", kernel, dtype, f"T_PAD={cfg.t_pad} D_PAD={cfg.d_pad} {mode_label}",
                                   dict(mode, IEEE=ieee, BLOCK_P=stk.BLOCK_P, T_PAD=cfg.t_pad, D_PAD=cfg.d_pad),
                                   cfg.num_warps, cfg.num_stages, arch,
                                   candidate=("temporal", name, ieee, cfg.t_pad, cfg.d_pad) if measure else None)


def _bit_tuples(n: int):
    return [tuple(bool(i >> b & 1) for b in range(n)) for i in range(1 << n)]


DUAL_MODES = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]  # (CHANNEL, ATTENTION, STAGE)
_DUAL_MODE_NAMES = {(0, 0, 0): "base/sequential", (0, 0, 1): "base/interpolation", (1, 0, 0): "plus/full/sequential",
                    (1, 0, 1): "plus/full/interpolation", (1, 1, 0): "plus/window/sequential",
                    (1, 1, 1): "plus/window/interpolation"}  # fmt: skip


def dual_channel_cases(arch: int, full: bool, measure: bool):
    limit = TARGETS[arch]
    kernels = (dtk._cogvideo_fwd_kernel, dtk._cogvideo_bwd_dkdv_kernel, dtk._cogvideo_bwd_dq_kernel)
    modes = DUAL_MODES if full else DUAL_MODES[-1:]
    for dtype, torch_dtype in DTYPES.items():
        ieee = torch_dtype == torch.float32
        for d_bucket in (64, 128, 256):
            for kind, kernel in enumerate(kernels):
                if measure:
                    configs = [dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, D_PAD=d_bucket, num_warps=c.num_warps,
                                    num_stages=c.num_stages, candidate=("dual_channel", kind, ieee, d_bucket, c))
                               for c in dtk._CONFIGS[(ieee, d_bucket)][kind]]  # fmt: skip
                else:
                    config = dtk._config(kind, d_bucket, torch_dtype, limit)
                    if config is None:
                        yield Excluded("dual_channel", kernel.__name__, dtype, f"D_PAD={d_bucket}", arch)
                        continue
                    configs = [config]
                for config in configs:
                    config = dict(config)
                    candidate = config.pop("candidate", None)
                    warps, stages = config.pop("num_warps"), config.pop("num_stages")
                    for mode in modes:
                        yield Case("dual_channel", kernel, dtype,
                                   f"D_PAD={d_bucket} {_DUAL_MODE_NAMES[mode]} {config['BLOCK_M']}x{config['BLOCK_N']}",
                                   dict(CHANNEL=mode[0], ATTENTION=mode[1], STAGE=mode[2], HAS_PAD=True, IEEE=ieee,
                                        **config),
                                   warps, stages, arch, candidate=candidate)  # fmt: skip
        if measure:
            continue
        for d_bucket in (64, 128, 256):  # the delta preprocess runs with the dQ kernel's query tile
            config = dtk._config(dtk._DQ, d_bucket, torch_dtype, limit)
            if config is not None:
                yield Case("dual_channel", dtk._cogvideo_bwd_delta_kernel, dtype, f"D_PAD={d_bucket}",
                           dict(BLOCK_M=config["BLOCK_M"], D_PAD=d_bucket), 4, 3, arch)  # fmt: skip
        for kernel in (dtk._mix_fwd_kernel, dtk._mix_bwd_kernel):
            yield Case("dual_channel", kernel, dtype, f"{dtk.MIX_BLOCK_R}x{dtk.MIX_BLOCK_C}",
                       dict(BLOCK_R=dtk.MIX_BLOCK_R, BLOCK_C=dtk.MIX_BLOCK_C), 4, 3, arch)  # fmt: skip
    if not measure:  # the tile-list pre-pass: integer work only, independent of dtype
        for mode in DUAL_MODES:
            for rows_are_keys in (False, True):
                label = f"{_DUAL_MODE_NAMES[mode]} keys={rows_are_keys}"
                yield Case("dual_channel", dtk._tile_list_kernel, "i32", label,
                           dict(CHANNEL=mode[0], ATTENTION=mode[1], STAGE=mode[2], ROW_BLOCK=64, COL_BLOCK=32,
                                ROWS_ARE_KEYS=rows_are_keys), 4, 3, arch)  # fmt: skip


def mesa_cases(arch: int, full: bool, measure: bool):
    """mesa_kl's configurations depend on the row shape only (R, C), not on shared memory: its kernels are
    elementwise plus row reductions, whose cross-warp scratch is a few KB. Every distinct (BLOCK_R, BLOCK_C,
    SINGLE_CHUNK, num_warps) _pick_config returns over the class counts is compiled."""
    if measure:
        return
    shapes = [(4096, c) for c in (2, 64, 1000, 2048, 8192, 10_000, 50_000)]
    for dtype in DTYPES:
        seen = set()
        for R, C in shapes:
            for with_grad in (False, True):
                block_r, block_c, single, warps = mtk._pick_config(R, C, with_grad)
                key = ("fwd", block_r, block_c, single, with_grad, warps)
                if key not in seen:
                    seen.add(key)
                    yield Case("mesa", mtk._mesa_kl_fwd_kernel, dtype,
                               f"{block_r}x{block_c} single={single} with_grad={with_grad}",
                               dict(BLOCK_R=block_r, BLOCK_C=block_c, SINGLE_CHUNK=single, WITH_GRAD=with_grad,
                                    COL_I64=False), warps, 3, arch)  # fmt: skip
            block_r, block_c, _, warps = mtk._pick_config(R, C)
            key = ("bwd", block_r, block_c, warps)
            if key not in seen:
                seen.add(key)
                yield Case("mesa", mtk._mesa_kl_bwd_kernel, dtype, f"{block_r}x{block_c}",
                           dict(BLOCK_R=block_r, BLOCK_C=block_c, COL_I64=False), warps, 3, arch)  # fmt: skip


GENERATORS = {"spatial": spatial_cases, "temporal": temporal_cases, "dual_channel": dual_channel_cases,
              "mesa": mesa_cases}  # fmt: skip


# -------------------------------------------------------------------------------------------------------------
# Compiling
# -------------------------------------------------------------------------------------------------------------


def _signature(case: Case) -> dict:
    def arg_type(name: str) -> str:
        if name.endswith("_ptr"):
            return _POINTER_TYPES.get(name, "*" + case.dtype)
        return "fp32" if name in _FLOAT_SCALARS else "i32"

    return {name: "constexpr" if name in case.constexprs else arg_type(name) for name in case.kernel.arg_names}


def _source(case: Case):
    """The kernel as a launch specializes it on a real device: torch allocations are 256-byte aligned and the
    integer arguments (sizes, strides) are often multiples of 16, so every pointer and integer argument carries
    tt.divisibility = 16. That is the costliest specialization: aligned loads let the pipeliner stage tiles in
    shared memory with cp.async (num_stages buffers); unaligned ones are not pipelined and need less."""
    signature = _signature(case)
    divisible = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(case.kernel.arg_names)
                 if signature[name] != "constexpr" and (signature[name].startswith("*") or signature[name] == "i32")}
    return ASTSource(fn=case.kernel, signature=signature, constexprs=case.constexprs, attrs=divisible)


def _options(case: Case) -> dict:
    return dict(num_warps=case.num_warps, num_stages=case.num_stages)


def shared_after_ttgir(case: Case) -> int:
    """``shared`` of the compiled kernel, from the TTGIR and Triton's shared-memory allocation pass only (the
    pass make_llir runs first; what follows it, LLVM and ptxas, does not change the allocation)."""
    from triton._C.libtriton import ir, nvidia
    from triton.backends.nvidia.compiler import get_ptx_version_from_options
    from triton.compiler.compiler import make_backend

    src, target = _source(case), GPUTarget("cuda", case.arch, 32)
    backend = make_backend(target)
    options = backend.parse_options(_options(case))
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)  # fmt: skip
    metadata = {}
    for stage in ("ttir", "ttgir"):
        module = stages[stage](module, metadata)
    pm = ir.pass_manager(module.context)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(
        pm, case.arch, get_ptx_version_from_options(options, case.arch)
    )  # fmt: skip
    pm.run(module, "allocate_shared_memory") if _pm_run_takes_name() else pm.run(module)
    return int(module.get_int_attr("ttg.shared") or 0)


def _pm_run_takes_name() -> bool:
    import inspect

    from triton._C.libtriton import ir

    try:
        return len(inspect.signature(ir.pass_manager.run).parameters) > 2
    except (TypeError, ValueError):  # pybind11 functions have no Python signature: triton 3.8 takes a name
        return True


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local memory per thread in bytes: register spills) of the cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return None, None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


_CASES: list[Case] = []  # set before the worker processes fork (jit functions do not pickle)


def run_case(index: int, full: bool) -> dict:
    case = _CASES[index]
    started = time.perf_counter()
    result = dict(family=case.family, kernel=case.name, dtype=case.dtype, label=case.label, arch=case.arch,
                  num_warps=case.num_warps, num_stages=case.num_stages, candidate=case.candidate,
                  regs=None, spills=None, error=None)  # fmt: skip
    try:
        if full:
            compiled = triton.compile(_source(case), target=GPUTarget("cuda", case.arch, 32), options=_options(case))
            result["shared"] = int(compiled.metadata.shared)
            result["regs"], result["spills"] = _resource_usage(compiled.asm["cubin"])
        else:
            try:
                result["shared"] = shared_after_ttgir(case)
            except (ImportError, AttributeError, TypeError):  # compiler internals of another triton version
                compiled = triton.compile(_source(case), target=GPUTarget("cuda", case.arch, 32),
                                          options=_options(case))  # fmt: skip
                result["shared"] = int(compiled.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
        result["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    result["seconds"] = time.perf_counter() - started
    return result


# -------------------------------------------------------------------------------------------------------------
# Driver and report
# -------------------------------------------------------------------------------------------------------------


def _line(r: dict) -> str:
    usage = f" regs {r['regs']} spills {r['spills']}" if r.get("regs") is not None else ""
    if r["error"]:
        return f"sm_{r['arch']} {r['dtype']} {r['kernel']} [{r['label']}]: FAILED {r['error']}"
    return (f"sm_{r['arch']} {r['dtype']} {r['kernel']} [{r['label']}] warps {r['num_warps']} stages "
            f"{r['num_stages']}: shared {r['shared']}{usage} ({r['seconds']:.1f} s)")  # fmt: skip


def write_report(path: str, results: list[dict], excluded: list[Excluded], full: bool) -> None:
    targets = sorted({r["arch"] for r in results} | {e.arch for e in excluded})
    lines = [
        "# Triton launch configurations per target",
        "",
        f"Generated by `scripts/compile_check_triton.py{' --full' if full else ''}` (triton {triton.__version__}, "
        f"no GPU: {'through ptxas' if full else 'shared memory from the TTGIR allocation pass'}). One row per "
        "kernel configuration its launcher can pick for the target's opt-in shared memory per block (bytes): "
        + ", ".join(f"sm_{a} {TARGETS[a]}" for a in targets)
        + ". `shared` is bytes per block; `regs` registers per thread; `spills` local memory per thread (bytes, "
        "register spills). The reasoning behind the configurations is in the launchers' docstrings.",
        "",
    ]
    for family in FAMILIES:
        rows = [r for r in results if r["family"] == family]
        if not rows:
            continue
        lines += [f"## {family}", "", "| target | dtype | kernel | case | warps | stages | shared | regs | spills |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['kernel']} | {r['label']} | {r['num_warps']} | "
                         f"{r['num_stages']} | {r.get('shared', 'FAILED')} | "
                         f"{r['regs'] if r['regs'] is not None else '-'} | "
                         f"{r['spills'] if r['spills'] is not None else '-'} |")  # fmt: skip
        out = [e for e in excluded if e.family == family]
        if out:
            lines += ["", "Excluded by the op's reasons (no configuration fits; `auto` picks another backend):", ""]
            lines += [f"- sm_{e.arch} {e.dtype} {e.kernel} {e.label}" for e in out]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=",".join(map(str, TARGETS)), help="compute capabilities (default: all five)")
    parser.add_argument("--family", default=",".join(FAMILIES), help="kernel families (default: all)")
    parser.add_argument("--full", action="store_true", help="every mode and sequence bucket, through ptxas")
    parser.add_argument("--ptxas", action="store_true",
                        help="compile through ptxas (registers and spills) without --full's every mode")
    parser.add_argument("--measure", action="store_true",
                        help="shared memory of every candidate of the configuration tables, max over targets/modes")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    parser.add_argument("--report", default=None, help="write a Markdown report (e.g. docs/triton_configs.md)")
    parser.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    parser.add_argument("--match", default=None,
                        help="only cases whose 'kernel dtype [label]' matches this regular expression")
    parser.add_argument("--every-target", action="store_true",
                        help="fast mode: compile for each target even where another of the same layout family "
                             "(sm_80/86/89/120: mma v2) already compiled the same configuration")
    parser.add_argument("--dry-run", action="store_true", help="count the compiles and exit")
    args = parser.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in TARGETS]
    if unknown:
        parser.error(f"--arch: unknown targets {unknown} (known: {list(TARGETS)})")
    cases, excluded = [], []
    for family in args.family.split(","):
        for arch in archs:
            for item in GENERATORS[family](arch, args.full, args.measure):
                (excluded if isinstance(item, Excluded) else cases).append(item)
    if args.match:
        pattern = re.compile(args.match)
        cases = [c for c in cases if pattern.search(f"{c.name} {c.dtype} [{c.label}]")]
    # Fast mode: sm_80, sm_86, sm_89 and sm_120 lower tl.dot to the same mma v2 layouts, and the shared memory of a
    # configuration was the same on all four for every configuration here (triton 3.8 and 3.9, docs/
    # triton_configs.md); a configuration two of them can pick is compiled once and checked against each limit.
    aliases: dict[int, int] = {}  # case index -> index of the case whose result it reuses
    if not (args.full or args.ptxas or args.measure or args.every_target):
        first: dict = {}
        for index, case in enumerate(cases):
            if case.arch in _MMA_V2_TARGETS:
                key = (case.name, case.dtype, tuple(sorted(case.constexprs.items())), case.num_warps, case.num_stages)
                aliases[index] = first.setdefault(key, index)
        aliases = {i: j for i, j in aliases.items() if i != j}
    print(f"[compile-check] triton {triton.__version__}, {len(cases) - len(aliases)} compiles "
          f"({'ptxas' if args.full or args.ptxas else 'fast, shared memory'}{', every mode' if args.full else ''}), "
          f"{len(excluded)} excluded configurations, "
          f"{args.jobs} jobs", flush=True)  # fmt: skip
    if args.dry_run:
        return 0
    started = time.perf_counter()
    results = []
    _CASES[:] = cases
    compiled = [i for i in range(len(cases)) if i not in aliases]
    context = multiprocessing.get_context("fork")
    by_index = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
        for index, result in zip(
            compiled, pool.map(run_case, compiled, [args.full or args.ptxas] * len(compiled), chunksize=1)
        ):
            by_index[index] = result
            if not args.quiet or result["error"]:
                print(_line(result), flush=True)
    for index, source in aliases.items():
        by_index[index] = dict(by_index[source], arch=cases[index].arch, seconds=0.0)
    results = [by_index[i] for i in range(len(cases))]
    failures = [r for r in results if r["error"]]
    over = [r for r in results if not r["error"] and not args.measure and r["shared"] > TARGETS[r["arch"]]]
    for r in over:
        print(f"OVER THE LIMIT: {_line(r)} > {TARGETS[r['arch']]}")
    spills = [r for r in results if (r["spills"] or 0) > 1024]
    for r in spills:
        print(f"spills over 1 KB: {_line(r)}")
    if args.measure:
        peak: dict = {}
        for r in results:
            if not r["error"]:
                peak[r["candidate"]] = max(peak.get(r["candidate"], 0), r["shared"])
        for candidate, shared in peak.items():
            print(f"measure {candidate}: {shared}")
    if args.report:
        write_report(args.report, results, excluded, args.full or args.ptxas)
    print(f"[compile-check] {len(results)} configurations ({len(compiled)} compiles) in "
          f"{time.perf_counter() - started:.0f} s: {len(failures)} failed, "
          f"{len(over)} over a target's shared memory, {len(spills)} spill over 1 KB, {len(excluded)} excluded")
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())
