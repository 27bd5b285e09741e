"""The CUDA build report: registers, spills, shared memory and theoretical occupancy of every CUDA kernel the
package builds, per GPU target, and the HMMA check of the tensor-core kernels; fails (exit 1) on what would not
launch or is not what the source says. Runs without a GPU (nvcc, ptxas and cuobjdump only).

    PYTHONPATH=pyext python scripts/cuda_build_report.py                 # table + JSON, exit 1 on a failed check
    options: --arch 80,86,89,90,120  --jobs N  --json FILE  --so PATH|none  --files a.cu,b.cu  --markdown FILE
             --every-target  --keep DIR  --quiet

How the numbers are made (docs/gpu_build_report.md):
- Every csrc/cuda/*.cu is compiled once per virtual architecture to PTX (nvcc -ptx, the flags of setup.py:
  compute_80 and compute_90, every template instantiation the launchers dispatch to), then assembled by ptxas -v
  for each target: compute_80 PTX for sm_80, sm_86, sm_89 and sm_120, compute_90 PTX for sm_90. ptxas gives
  registers per thread, the stack frame, spill stores / loads (bytes) and static shared memory per kernel. The
  front end (the torch headers) is the expensive part, about 10 s per file and virtual arch; ptxas about 2.5 s
  per file and target: roughly 1.5-2 minutes on 2 idle cores with --jobs 2.
- sm_89: ptxas gives exactly sm_86's output (checked for every kernel with --every-target), so sm_86's is
  reported for it, against sm_89's limits (SAME_PTXAS_OUTPUT).
- sm_86 / sm_89: assembled from compute_80 PTX (what a native 8.6 / 8.9 build produces: no source tests
  __CUDA_ARCH__ beyond < 800). CI's build (TORCH_CUDA_ARCH_LIST="8.0;9.0") has no sm_86 / sm_89 code; those
  cards run its sm_80 cubin (binary compatible within major version 8), whose registers are the sm_80 column.
- sm_120: the build list holds no sm_120 code and CI's build embeds no PTX, so an RTX 50xx runs these kernels only
  from a native build (scripts/setup.sh on that card builds for its arch) or a +PTX build (the driver JIT-compiles
  the PTX). The sm_120 column is nvcc 13.0's ptxas on compute_80 PTX: the figures a native build gets; a driver's
  JIT may allocate registers a little differently.
- The built extension (torchnova/_C*.so, --so): its sm_80 / sm_90 cubins are read with cuobjdump -res-usage, and
  every kernel's registers, stack and static shared memory must equal ptxas' figures here (so the report is about
  the binary that ships, not a lookalike).
- Dynamic shared memory: what each launcher requests (csrc/cuda/shared_memory_plan.h through
  torchnova._C.cuda_shared_memory_bytes, the numbers the Python cuda reasons compare with the device's
  shared_memory_per_block_optin), for the configurations those reasons allow on each target (LAUNCH_PLANS below).
  Whether a kernel uses dynamic shared memory at all is read from its PTX (a reference to the extern .shared
  array), so a new kernel cannot slip through with an unknown size.
- Threads per block: the kernel's __launch_bounds__ (.maxntid in the PTX), or the launcher's own rule where it
  launches fewer (temporal: as many warps, up to 4, as the device's shared memory allows).
- Theoretical occupancy: the CUDA occupancy calculator's rules (cuda_occupancy.h): registers allocated per warp in
  units of 256, per SM sub-partition (4 of 16K registers); shared memory per block rounded up to 128 bytes plus
  1 KiB reserved by the system per block (sm_80+); the per-SM limits of blocks, warps and shared memory of ARCHS.
- Tensor-core kernels: a kernel whose source uses the tensor_core.cuh mma functions (tc::mma_*), directly or
  through device functions it calls, must show HMMA instructions in cuobjdump -sass of every target's cubin.

Exit status 1 on: a spill not in SPILL_ALLOWLIST (or over its byte limit); static + dynamic shared memory over a
target's opt-in limit per block for a configuration the cuda reasons allow there; a configuration that cannot
launch (zero blocks per SM, e.g. registers x threads over 64K); a tensor-core kernel without HMMA; a kernel that
uses dynamic shared memory without a launch plan, or has no known threads per block; a .so whose cubins disagree
with this compile; a compile failure; no kernel found.

cuobjdump and nvdisasm: the pinned pip packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm (scripts/setup.sh),
found under site-packages/nvidia/cu13/bin; else $CUDA_HOME/bin, else PATH, else Triton's bundled copies.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = os.path.join(ROOT, "csrc", "cuda")
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "build_report", "cuda_build_report.json")

# -------------------------------------------------------------------------------------------------------------
# Targets
# -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM and per-block limits of one compute capability (CUDA programming guide, "Compute Capabilities")."""

    sm: int
    cards: str
    ptx: int  # the virtual arch whose PTX is assembled for it
    smem_optin: int  # shared memory one block may opt into (bytes): sharedMemPerBlockOptin
    smem_per_sm: int  # shared memory per SM at the largest carveout (bytes)
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, allocated per warp
    sub_partitions: int = 4
    smem_alloc_unit: int = 128
    smem_reserved_per_block: int = 1024  # the system's shared memory per block, sm_80+
    smem_default: int = 48 * 1024  # dynamic shared memory without cudaFuncAttributeMaxDynamicSharedMemorySize
    max_threads_per_block: int = 1024


KIB = 1024
ARCHS = {
    80: Arch(80, "A100, A30", 80, 163 * KIB, 164 * KIB, 64, 32),
    86: Arch(86, "RTX 30xx, A10, A40", 80, 99 * KIB, 100 * KIB, 48, 16),
    89: Arch(89, "RTX 40xx, L4, L40", 80, 99 * KIB, 100 * KIB, 48, 24),
    90: Arch(90, "H100, H200", 90, 227 * KIB, 228 * KIB, 64, 32),
    120: Arch(120, "RTX 50xx (native or PTX JIT build)", 80, 99 * KIB, 100 * KIB, 48, 32),
}

# -------------------------------------------------------------------------------------------------------------
# Explained spills: (kernel base name, regex of its short template arguments ("fp32,128"; None: all), targets
# (None: all)) -> (bytes, why). A spill is allowed when its stores and loads are each at most the limit. Keep
# each limit tight: a change that spills more fails CI and has to explain itself here.
# -------------------------------------------------------------------------------------------------------------

SPILL_ALLOWLIST: dict[tuple[str, str | None, tuple[int, ...] | None], tuple[int, str]] = {
    ("spatial_dq_kernel", r"\w+,128", (80, 86, 89)): (
        8,
        "D<=128 bucket: at 128 registers ptxas parks one 32-bit value (4 B stores, 4 B loads, 8 B stack): its "
        "SASS has one STL before the key-block loop and one LDL in the dq write-back after it, so one store and "
        "one load per thread, nothing inside the loop",
    ),
    # The rotary instances (template flag true; issue 13): the rotation keeps each lane's partner element and the
    # cos / sin of its column live across the tile loads. Found by this report after the merge; where the STL / LDL
    # sit in the SASS has not been analysed yet, and no GPU has timed them (docs/spacetime.md, rotary).
    ("temporal_fwd_kernel", r"\w+,true", (86, 89)): (
        40,
        "rotary forward on the 48-warp cards: ptxas allocates 40 registers (as for the plain instances, which do "
        "not spill) and spills 32 B stores / 40 B loads of the rotation's extra values; sm_80/90/120: no spill",
    ),
    ("temporal_bwd_kernel", r"\w+,true", (90,)): (
        28,
        "rotary backward, sm_90: 72 registers as the plain instances, 24-28 B (the plain ones: 12-16 B below) for "
        "the partner dq'/dk' shuffle and the transpose rotation's cos / sin",
    ),
    ("temporal_bwd_kernel", r"(fp16|bf16),true", (120,)): (
        88,
        "rotary backward, sm_120 only (64 registers there; nvcc 13.0's ptxas on compute_80 PTX): 88 B; sm_120 runs "
        "these kernels only from a native or +PTX build (docs/gpu_build_report.md)",
    ),
    ("temporal_bwd_kernel", None, (86, 89, 90, 120)): (
        16,
        "three or four 32-bit loop-invariant values (12-16 B; sm_120 fp32: 8 B) at 72 registers (64 on sm_120): "
        "the SASS stores them once before the warp's loop over its (batch, position) problems and reloads them "
        "once per problem, outside the T x T and T x D inner loops (sm_80 gets 96 registers and no spill)",
    ),
    ("cogvideo_attention_fwd_kernel", r"\w+,(64|128)", (120,)): (
        84,
        "sm_120 only (its ptxas gives these 72-80 registers where sm_8x/9x get 94-111, and no spill there): two "
        "to four 32-bit values held across the key-tile loop are stored before it and reloaded 4-11 times per "
        "iteration of a fully unrolled tile body of about 10K instructions (the D 64 forward also re-stores two "
        "per iteration): a few L1 hits per tile",
    ),
    ("cogvideo_attention_bwd_dkdv_kernel", r"\w+,256", (120,)): (
        32,
        "sm_120 only (168 registers there, 207-210 on sm_8x/9x, no spill there): one 64-bit value stored "
        "before the query-tile loop and reloaded 4 times per iteration of a body of about 10K instructions",
    ),
    ("mesa_kl_fwd_kernel", r"fp64,2", (90,)): (
        16,
        "fp64, 2-wide packets, sm_90 only: around each of the two inlined double exp() polynomials of a packet "
        "ptxas parks one 64-bit register pair (STL.64 / LDL.LU.64 a few instructions apart) to hold ln 2's low "
        "constant: 2 x 8 B per packet, to the thread's own stack line in L1; fp64 is the reference-grade dtype "
        "of this memory-bound kernel, not a speed target",
    ),
    # The tensor-core backward (attention_tc_bwd.cu; docs/performance.md, "Tensor-core kernels: the backward"):
    # fp32 accumulators of the padded head dim for the whole loop (dK/dV: 2 x P / 2 floats; dQ: P / 2) plus the
    # 16 x R products S and dP and the swizzled fragment addresses of four tiles; the CogVideo instances also inline
    # the visibility rule (integer divisions, block_may_see) in the pipelined loop. Measured with CUDA 13.0 ptxas
    # (every row of the report for attention_tc_bwd.cu); the arch-specific entry first (the first match applies).
    # Spills on sm_120 are the largest (its ptxas allocates differently from the same compute_80 PTX).
    ("attention_tc_fwd_kernel", r"fp32,64,.*CogVideoVisibility", (120,)): (
        44, "TF32 forward with the CogVideo rule, sm_120 only (nvcc 13.0's ptxas on compute_80 PTX; no spill on "
        "sm_80/86/89/90): 28 B stores / 44 B loads; TF32 runs only when torch allows TF32 matmuls"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),32,.*CogVideoPolicy", (120,)): (12, "sm_120 ptxas"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),32,.*DenseVisibility", (120,)): (32, "sm_120 ptxas"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),32,.*DenseVisibility", None): (16, "sm_90: ptxas stops at 168 registers"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),64,.*CogVideoPolicy", (120,)): (32, "sm_120 ptxas"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),64,.*DenseVisibility", (120,)): (40, "sm_120 ptxas"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),128,.*CogVideoPolicy", (120,)): (48, "sm_120 ptxas"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),128,.*CogVideoPolicy", None): (
        20, "at the 255-register limit, plus the visibility rule"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),128,.*DenseVisibility", (120,)): (60, "sm_120 ptxas"),
    ("tc_bwd_dkdv_kernel", r"(fp16|bf16),128,.*DenseVisibility", None): (
        8, "at the 255-register limit (2 x 64 accumulator floats + S^T, dP^T)"),
    ("tc_bwd_dq_kernel", r"(fp16|bf16),32,.*CogVideoPolicy", (120,)): (120, "sm_120 ptxas"),
    ("tc_bwd_dq_kernel", r"(fp16|bf16),32,.*CogVideoPolicy", (80,)): (
        248, "ptxas settles on 128 registers (162 and no spill on sm_90)"),
    ("tc_bwd_dq_kernel", r"(fp16|bf16),64,.*CogVideoPolicy", (120,)): (112, "sm_120 ptxas"),
    ("tc_bwd_dq_kernel", r"(fp16|bf16),64,.*DenseVisibility", None): (
        12, "ptxas stops at 168 registers (3 blocks per SM)"),
    ("tc_bwd_dq_kernel", r"(fp16|bf16),128,.*CogVideoPolicy", (120,)): (36, "sm_120 ptxas"),
}

# -------------------------------------------------------------------------------------------------------------
# Occupancy (the rules of the CUDA occupancy calculator, cuda_occupancy.h)
# -------------------------------------------------------------------------------------------------------------


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclasses.dataclass
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float  # warps_per_sm / max_warps
    limiter: str  # what bounds blocks_per_sm ("registers", "shared memory", "warps", "blocks"; "+" joins ties),
    # or "cannot launch (...)"
    by_regs: int
    by_smem: int
    by_warps: int


def occupancy(arch: Arch, threads: int, regs: int, smem_bytes: int) -> Occupancy:
    """Theoretical blocks and warps per SM of a kernel with `regs` registers per thread, `threads` per block and
    `smem_bytes` of static + dynamic shared memory per block."""
    warps = -(-threads // 32)
    if threads < 1 or threads > arch.max_threads_per_block:
        return Occupancy(0, 0, 0.0, f"{threads} threads per block", 0, 0, 0)
    by_warps = min(arch.max_blocks, arch.max_warps // warps)
    if regs > arch.max_regs_per_thread:
        by_regs = 0
    elif regs == 0:
        by_regs = arch.max_blocks
    else:
        regs_per_warp = round_up(regs * 32, arch.reg_alloc_unit)
        if regs_per_warp * warps > arch.regs_per_block:
            by_regs = 0
        else:
            warps_per_partition = (arch.regs_per_sm // arch.sub_partitions) // regs_per_warp
            by_regs = warps_per_partition * arch.sub_partitions // warps
    if smem_bytes > arch.smem_optin:
        by_smem = 0
    else:
        by_smem = arch.smem_per_sm // round_up(smem_bytes + arch.smem_reserved_per_block, arch.smem_alloc_unit)
    blocks = min(by_warps, by_regs, by_smem)
    if blocks == 0:
        why = "registers" if by_regs == 0 else "shared memory" if by_smem == 0 else "warps"
        return Occupancy(0, 0, 0.0, f"cannot launch ({why})", by_regs, by_smem, by_warps)
    thread_limit = "blocks" if by_warps == arch.max_blocks and arch.max_blocks * warps < arch.max_warps else "warps"
    limiter = "+".join(name for name, n in (("registers", by_regs), ("shared memory", by_smem),
                                            (thread_limit, by_warps)) if n == blocks)
    return Occupancy(blocks, blocks * warps, blocks * warps / arch.max_warps, limiter, by_regs, by_smem, by_warps)


# -------------------------------------------------------------------------------------------------------------
# Parsing: ptxas -v, cuobjdump -res-usage, cuobjdump -sass, PTX
# -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PtxasEntry:
    name: str  # mangled
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0  # static shared memory (bytes)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, PtxasEntry]:
    """Entry functions of `ptxas -v` output: {mangled name: figures}. Non-entry functions (their own "Function
    properties" blocks, for device functions that were not inlined) are skipped."""
    entries: dict[str, PtxasEntry] = {}
    current: PtxasEntry | None = None  # the entry whose lines follow
    props_of: str | None = None  # the function the last "Function properties" line named
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = entries.setdefault(m.group(1), PtxasEntry(m.group(1)))
            props_of = None
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            props_of = m.group(1)
            continue
        m = _PTXAS_FRAME.search(line)
        if m and current is not None and props_of == current.name:
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
            continue
        m = _PTXAS_USED.search(line)
        if m and current is not None:
            current.regs = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
            current = None
    return entries


@dataclasses.dataclass
class ResUsage:
    regs: int
    stack: int
    shared: int
    local: int


_RES_ARCH = re.compile(r"^\s*arch = (sm_\d+a?)")
_RES_FUNC = re.compile(r"^\s*Function (\S+?):?\s*$")
_RES_FIELDS = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict[int, dict[str, ResUsage]]:
    """`cuobjdump -res-usage` of a fat binary / .so: {sm: {mangled name: usage}}. The arch comes from the
    "arch = sm_XX" line of each embedded cubin's header ("Fatbin elf code")."""
    out: dict[int, dict[str, ResUsage]] = {}
    arch: int | None = None
    func: str | None = None
    for line in text.splitlines():
        m = _RES_ARCH.match(line)
        if m:
            arch = int(re.sub(r"\D", "", m.group(1)))
            continue
        m = _RES_FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        m = _RES_FIELDS.search(line)
        if m and func is not None and arch is not None:
            out.setdefault(arch, {})[func] = ResUsage(*(int(g) for g in m.groups()))
            func = None
    return out


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_SASS_HMMA = re.compile(r"\bHMMA\.")


def count_hmma(sass: str) -> dict[str, int]:
    """HMMA instructions per function of `cuobjdump -sass` output."""
    counts: dict[str, int] = {}
    func = None
    for line in sass.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            func = m.group(1)
            counts.setdefault(func, 0)
        elif func is not None and _SASS_HMMA.search(line):
            counts[func] += 1
    return counts


@dataclasses.dataclass
class PtxEntry:
    name: str
    maxntid: int | None  # threads per block of __launch_bounds__
    dynamic_smem: bool  # references the extern (dynamic) shared array
    mma: int  # mma.sync instructions in the PTX body


_PTX_EXTERN_SHARED = re.compile(r"^\s*\.extern\s+\.shared\s+[^;]*?(\w+)\s*\[\s*\]\s*;", re.M)
_PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(", re.M)
_PTX_MAXNTID = re.compile(r"\.maxntid\s+(\d+)\s*(?:,\s*(\d+))?\s*(?:,\s*(\d+))?")


def parse_ptx(ptx: str) -> dict[str, PtxEntry]:
    externs = set(_PTX_EXTERN_SHARED.findall(ptx))
    entries = {}
    for m in _PTX_ENTRY.finditer(ptx):
        name = m.group(1)
        body_start = ptx.find("{", m.end())
        header = ptx[m.end():body_start]
        depth, i = 0, body_start
        while i < len(ptx):
            c = ptx[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        body = ptx[body_start:i]
        nt = _PTX_MAXNTID.search(header)
        maxntid = math.prod(int(g) for g in nt.groups() if g) if nt else None
        uses_dynamic = any(re.search(rf"\b{re.escape(e)}\b", body) for e in externs)
        entries[name] = PtxEntry(name, maxntid, uses_dynamic, len(re.findall(r"\bmma\.sync\b", body)))
    return entries


# -------------------------------------------------------------------------------------------------------------
# Names
# -------------------------------------------------------------------------------------------------------------


def demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    if not names:
        return {}
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def split_kernel_name(demangled: str) -> tuple[str, str]:
    """("spatial_fwd_kernel", "c10::Half, 64") from "void torchnova::(anonymous namespace)::spatial_fwd_kernel<c10::
    Half, 64>(...)"; template arguments "" for a plain function."""
    head = demangled.replace("(anonymous namespace)", "{anonymous}")
    depth, cut = 0, len(head)
    for i, c in enumerate(head):  # the parameter list: the first "(" outside <>
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            cut = i
            break
    head = head[:cut]
    targs = ""
    if head.endswith(">"):
        depth = 0
        for i in range(len(head) - 1, -1, -1):
            if head[i] == ">":
                depth += 1
            elif head[i] == "<":
                depth -= 1
                if depth == 0:
                    targs, head = head[i + 1:-1], head[:i]
                    break
    base = re.split(r"::|\s", head)[-1]
    return base, targs.strip()


def template_ints(targs: str) -> list[int]:
    return [int(x) for x in re.findall(r"(?<![\w.])(-?\d+)(?![\w.])", targs)]


DTYPE_NAMES = {"c10::Half": "fp16", "c10::BFloat16": "bf16", "float": "fp32", "double": "fp64"}


def short_targs(targs: str) -> str:
    for long, short in DTYPE_NAMES.items():
        targs = re.sub(rf"\b{re.escape(long)}\b", short, targs)
    return targs.replace(" ", "")


# -------------------------------------------------------------------------------------------------------------
# Source: kernels, and which of them are tensor-core kernels
# -------------------------------------------------------------------------------------------------------------

_TC_CALL = re.compile(r"\btc::mma_\w+|\bmma_m\d+n\d+k\d+\w*\s*\(")


def strip_comments_and_strings(src: str) -> str:
    pattern = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'", re.S)
    return pattern.sub(lambda m: " " if m.group(0)[0] in "/" else '""', src)


def _matching(text: str, i: int, open_c: str, close_c: str) -> int:
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_c:
            depth += 1
        elif text[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


def function_bodies(src: str) -> list[tuple[str, str, bool]]:
    """(name, body, is_kernel) of every function defined with a body in `src` (comments stripped), at namespace
    or class scope. Crude but sufficient for this code base: a "{" preceded by ")" (after trailing qualifiers)
    opens a function body; namespace / struct / class bodies are walked into."""
    text = strip_comments_and_strings(src)
    out = []
    i = 0
    while i < len(text):
        j = text.find("{", i)
        if j < 0:
            break
        before = re.sub(r"(\s|\bconst\b|\bnoexcept\b|\boverride\b|\bfinal\b|->\s*[\w:<>, ]+)*$", "", text[i:j])
        if before.endswith(")"):
            close = i + len(before) - 1
            depth, k = 0, close
            while k >= 0:
                if text[k] == ")":
                    depth += 1
                elif text[k] == "(":
                    depth -= 1
                    if depth == 0:
                        break
                k -= 1
            name_m = re.search(r"(~?\w+)\s*$", text[:k])
            end = _matching(text, j, "{", "}")
            if name_m:
                stmt_start = max(text.rfind(";", 0, k), text.rfind("}", 0, k), text.rfind("{", 0, k)) + 1
                out.append((name_m.group(1), text[j:end + 1], "__global__" in text[stmt_start:k]))
            i = end + 1
        else:
            i = j + 1  # namespace / struct / class / enum / initializer: walk in
    return out


def local_includes(path: str, seen: set[str] | None = None) -> list[str]:
    """`path` and the project headers it includes (#include "..."), transitively."""
    seen = set() if seen is None else seen
    path = os.path.abspath(path)
    if path in seen or not os.path.exists(path):
        return []
    seen.add(path)
    files = [path]
    with open(path) as f:
        src = f.read()
    for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src, re.M):
        for base in (os.path.dirname(path), os.path.join(ROOT, "csrc")):
            cand = os.path.join(base, inc)
            if os.path.exists(cand):
                files += local_includes(cand, seen)
                break
    return files


def tensor_core_kernels(cu_path: str) -> tuple[set[str], set[str]]:
    """(kernels defined in `cu_path`, the subset that are tensor-core kernels): a kernel is a tensor-core kernel
    when its body calls a tensor_core.cuh mma function (tc::mma_*), directly or through functions defined in the
    file or the project headers it includes."""
    functions: dict[str, list[str]] = {}
    kernels: set[str] = set()
    for path in local_includes(cu_path):
        if os.path.basename(path) == "tensor_core.cuh":
            continue  # the mma functions themselves: leaves, matched by _TC_CALL
        with open(path) as f:
            src = f.read()
        for name, body, is_kernel in function_bodies(src):
            functions.setdefault(name, []).append(body)
            if is_kernel and path == os.path.abspath(cu_path):
                kernels.add(name)
    direct = {n for n, bodies in functions.items() if any(_TC_CALL.search(b) for b in bodies)}
    calls = {n: set(re.findall(r"\b(\w+)\s*(?:<[^;{}()]*>)?\s*\(", " ".join(b))) & functions.keys()
             for n, b in functions.items()}
    tc = set(direct)
    changed = True
    while changed:
        changed = False
        for n, callees in calls.items():
            if n not in tc and callees & tc:
                tc.add(n)
                changed = True
    return kernels, kernels & tc


# -------------------------------------------------------------------------------------------------------------
# Launch plans: the dynamic shared memory and threads of each kernel's launches, and which the reasons allow
# -------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    label: str
    threads: int
    dynamic: int  # bytes of dynamic shared memory
    allowed: bool  # whether the op's cuda reasons allow this configuration on the target
    note: str = ""


SmemFn = Callable[[str, int, int], int]  # (plan kernel, frames, head dim) -> bytes (torchnova._C.cuda_shared_memory_bytes)

# Head-dim buckets of the template kernels: (lower bound, upper bound) of D per kHeadDimMax / kDMax.
_BUCKETS = {64: (1, 64), 128: (65, 128), 256: (129, 256)}


def _bucket_launches(targs: str, maxntid: int, arch: Arch, smem: SmemFn, own: str, checked: tuple[str, ...],
                     buckets: dict[int, tuple[int, int]] = _BUCKETS):
    """Kernels templated on the head-dim bucket (the first integer template argument, after the dtype): the
    largest D of the bucket the reasons allow on `arch` (every launch plan in `checked` fits the opt-in limit)."""
    bucket = template_ints(targs)[0]
    lo, hi = buckets[bucket]
    for D in range(hi, lo - 1, -1):
        if all(smem(k, 1, D) <= arch.smem_optin for k in checked):
            return [Launch(f"D={D}" + ("" if D == hi else f" (D {D + 1}-{hi} excluded)"), maxntid, smem(own, 1, D), True)]
    return [Launch(f"D={lo}-{hi}", maxntid, smem(own, 1, hi), False, "excluded by the cuda reasons")]


def _temporal_launches(own: str, checked: tuple[str, ...]):
    def plan(targs: str, maxntid: int, arch: Arch, smem: SmemFn):
        launches = []
        max_t = max((T for T in range(1, 129) if all(smem(k, T, 1) <= arch.smem_optin for k in checked)), default=0)
        for T in sorted({16, 32, 64, 128, max_t} - {0}):
            per_warp = smem(own, T, 1)
            allowed = T <= max_t
            warps = min(maxntid // 32, arch.smem_optin // per_warp) if per_warp <= arch.smem_optin else 1
            launches.append(Launch(f"T={T}", warps * 32, warps * per_warp, allowed,
                                   "" if allowed else "excluded by the cuda reasons"))
        return launches

    return plan


def _bucket(own: str, checked: tuple[str, ...], buckets: dict[int, tuple[int, int]] = _BUCKETS):
    return lambda targs, maxntid, arch, smem: _bucket_launches(targs, maxntid, arch, smem, own, checked, buckets)


# Tensor-core backward (attention_tc_bwd.cu): templated on the padded head dim 32 / 64 / 128 (its integer template
# argument), with one fixed launch size per width (that of D = the width). The kernel choice
# (use_tensor_core_backward) runs the pair only where both kernels' shared memory fits the device, else the SIMT
# backward; the pair is never excluded by the reasons, so a width that does not fit is reported as not run.
_TC_BWD_WIDTHS = {32: (1, 32), 64: (33, 64), 128: (65, 128)}


def _tc_bwd(own: str):
    def plan(targs: str, maxntid: int, arch: Arch, smem: SmemFn):
        lo, hi = _TC_BWD_WIDTHS[template_ints(targs)[-1]]
        fits = all(smem(k, 1, hi) <= arch.smem_optin for k in ("tc_bwd_dkdv", "tc_bwd_dq"))
        return [Launch(f"D={lo}-{hi}", maxntid, smem(own, 1, hi), fits, "" if fits else "the SIMT backward runs instead")]

    return plan


# kernel base name -> plan(template args, maxntid, arch, smem_fn) -> launches. Only kernels that use dynamic
# shared memory need one; `checked` lists the shared_memory_plan.h kernels whose sizes the op's cuda reasons
# compare with the device limit before the kernel can run (the backward's reasons include the forward's).
def _tc_fwd_launches(targs: str, maxntid: int, arch: Arch, smem: SmemFn):
    """attention_tc_fwd_kernel<scalar_t, kDPad, Visibility>: kDPad is the bucket; fp32 (TF32) tiles are 4-byte.
    The launcher takes the tensor-core kernel only where its own plan fits (otherwise the SIMT kernel runs)."""
    own = "attention_tc_fwd_tf32" if short_targs(targs).startswith("fp32") else "attention_tc_fwd"
    return _bucket_launches(targs, maxntid, arch, smem, own, (own,))


LAUNCH_PLANS = {
    "attention_tc_fwd_kernel": _tc_fwd_launches,
    "spatial_fwd_kernel": _bucket("spatial_fwd", ("spatial_fwd",)),
    "spatial_dkdv_kernel": _bucket("spatial_dkdv", ("spatial_fwd", "spatial_dkdv", "spatial_dq")),
    "spatial_dq_kernel": _bucket("spatial_dq", ("spatial_fwd", "spatial_dkdv", "spatial_dq")),
    "temporal_fwd_kernel": _temporal_launches("temporal_fwd", ("temporal_fwd",)),
    "temporal_bwd_kernel": _temporal_launches("temporal_bwd", ("temporal_fwd", "temporal_bwd")),
    "cogvideo_attention_fwd_kernel": _bucket("cogvideo_fwd", ("cogvideo_fwd", "cogvideo_bwd")),
    "cogvideo_attention_bwd_dkdv_kernel": _bucket("cogvideo_bwd", ("cogvideo_fwd", "cogvideo_bwd")),
    "cogvideo_attention_bwd_dq_kernel": _bucket("cogvideo_bwd", ("cogvideo_fwd", "cogvideo_bwd")),
    "tc_bwd_dkdv_kernel": _tc_bwd("tc_bwd_dkdv"),
    "tc_bwd_dq_kernel": _tc_bwd("tc_bwd_dq"),
}


def launches_of(base: str, targs: str, ptx: PtxEntry, arch: Arch, smem: SmemFn) -> tuple[list[Launch], str | None]:
    """The launches to report for a kernel on `arch`, or an error why they are unknown."""
    if ptx.maxntid is None:
        return [], "no threads per block known: give the kernel __launch_bounds__ (or a launch plan)"
    if base in LAUNCH_PLANS:
        return LAUNCH_PLANS[base](targs, ptx.maxntid, arch, smem), None
    if ptx.dynamic_smem:
        return [], ("uses dynamic shared memory but has no entry in LAUNCH_PLANS (scripts/cuda_build_report.py): "
                    "add how its launcher sizes it")
    return [Launch("", ptx.maxntid, 0, True)], None


# -------------------------------------------------------------------------------------------------------------
# Checks
# -------------------------------------------------------------------------------------------------------------


def spill_allowance(base: str, targs: str, sm: int) -> tuple[int, str] | None:
    for (name, t, arch), allowance in SPILL_ALLOWLIST.items():
        if name == base and (t is None or re.fullmatch(t, short_targs(targs))) and (arch is None or sm in arch):
            return allowance
    return None


@dataclasses.dataclass
class Row:
    """One kernel (instantiation) x target x launch configuration."""

    file: str
    kernel: str
    targs: str
    sm: int
    config: str
    threads: int
    regs: int
    stack: int
    spill_stores: int
    spill_loads: int
    static_smem: int
    dynamic_smem: int
    smem_limit: int
    allowed: bool
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float
    limiter: str
    tensor_core: bool
    hmma: int | None
    note: str = ""


def check_row(row: Row) -> list[str]:
    """The failures of one row (empty if none)."""
    errors = []
    kernel = f"sm_{row.sm} {row.kernel}<{short_targs(row.targs)}>"
    where = f"{kernel} {row.config}".rstrip()
    if row.spill_stores or row.spill_loads:
        allowance = spill_allowance(row.kernel, row.targs, row.sm)
        worst = max(row.spill_stores, row.spill_loads)
        if allowance is None:
            errors.append(f"{kernel}: spills {row.spill_stores} B stores / {row.spill_loads} B loads, not in "
                          f"SPILL_ALLOWLIST (explain it there with a byte limit, or remove the spill)")
        elif worst > allowance[0]:
            errors.append(f"{kernel}: spills {worst} B, over its allowance of {allowance[0]} B")
    if row.allowed:
        total = row.static_smem + row.dynamic_smem
        if total > row.smem_limit:
            errors.append(f"{where}: {row.static_smem} B static + {row.dynamic_smem} B dynamic shared memory > "
                          f"{row.smem_limit} B per block on sm_{row.sm}, and the cuda reasons allow this configuration")
        elif row.blocks_per_sm == 0:
            errors.append(f"{where}: {row.limiter}: {row.regs} registers x {row.threads} threads, {total} B shared memory")
    if row.tensor_core and not row.hmma:
        errors.append(f"{kernel}: a tensor-core kernel (its source calls tc::mma_*) without HMMA in its SASS")
    return errors


def report_errors(rows: list[Row]) -> list[str]:
    """Every row's failures, and the report's own: no kernel at all."""
    errors = list(dict.fromkeys(e for row in rows for e in check_row(row)))  # once per kernel, not per launch
    if not rows:
        errors.append("no CUDA kernel found: a report about nothing cannot pass")
    return errors


# -------------------------------------------------------------------------------------------------------------
# Tools and compiling
# -------------------------------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    env = os.environ.get(f"TORCHNOVA_{name.upper()}")
    if env:
        return env
    candidates = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        candidates += glob.glob(os.path.join(sp, "nvidia", "cu1*", "bin", name))
        candidates += glob.glob(os.path.join(sp, "nvidia", "cuda_*", "bin", name))
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", name))
    which = shutil.which(name)
    if which:
        candidates.append(which)
    for sp in sys.path:
        candidates.append(os.path.join(sp, "triton", "backends", "nvidia", "bin", name))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_command(nvcc: str, cu: str, virtual: int, out: str) -> list[str]:
    """The device half of setup.py's nvcc command, stopped at PTX."""
    import torch.utils.cpp_extension as ext

    includes = [os.path.join(ROOT, "csrc")] + ext.include_paths(device_type="cuda")
    for path in sys.path:  # torch's CUDA wheels' headers (setup.py's nvidia_wheel_include_dirs)
        includes += [d for d in glob.glob(os.path.join(path, "nvidia", "cu1*", "include")) if os.path.isdir(d)]
    includes.append(sysconfig.get_paths()["include"])
    return [nvcc, "-std=c++20", "--expt-relaxed-constexpr", "-O3", f"-arch=compute_{virtual}", "-ptx",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-DTORCHNOVA_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-I{d}" for d in dict.fromkeys(includes)), cu, "-o", out]


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@dataclasses.dataclass
class Compiled:
    cu: str
    sm: int
    ptx: dict[str, PtxEntry]
    ptxas: dict[str, PtxasEntry]
    hmma: dict[str, int] | None  # only for files with tensor-core kernels
    seconds: float


# Targets whose ptxas output equals another's: sm_89 (Ada) has sm_86's (Ampere GA10x) instruction set, register
# file and scheduling model; ptxas 13.0 gave identical registers, stack, spills and shared memory for all 97 kernel
# instantiations on both (2026-12-05, --every-target). The report then assembles sm_86 once and reports it for
# both, against each card's own limits (dual_channel_attention.cu alone costs about a minute of ptxas per target).
SAME_PTXAS_OUTPUT = {89: 86}


def compile_all(cus: list[str], sms: list[int], jobs: int, tools: dict, workdir: str, tc_files: set[str],
                log=print, every_target: bool = False) -> tuple[list[Compiled], list[str], dict]:
    errors: list[str] = []
    timings = {"ptx": {}, "ptxas": {}}
    virtuals = sorted({ARCHS[sm].ptx for sm in sms})
    ptx_paths: dict[tuple[str, int], str] = {}

    def front(cu, v):
        out = os.path.join(workdir, f"{os.path.basename(cu)}.compute_{v}.ptx")
        t0 = time.perf_counter()
        proc = run(nvcc_command(tools["nvcc"], cu, v, out))
        return cu, v, out, proc, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for cu, v, out, proc, secs in pool.map(lambda a: front(*a), [(c, v) for c in cus for v in virtuals]):
            timings["ptx"][f"{os.path.basename(cu)} compute_{v}"] = round(secs, 1)
            if proc.returncode != 0:
                errors.append(f"nvcc -ptx {os.path.basename(cu)} compute_{v} failed:\n{proc.stderr[-3000:]}")
            else:
                ptx_paths[(cu, v)] = out
                log(f"[cuda-build-report] {os.path.basename(cu)} -> compute_{v} PTX: {secs:.1f} s")

    sass_env = dict(os.environ)
    if tools.get("nvdisasm"):
        sass_env["PATH"] = os.path.dirname(tools["nvdisasm"]) + os.pathsep + sass_env.get("PATH", "")

    def back(cu, sm):
        v = ARCHS[sm].ptx
        cubin = os.path.join(workdir, f"{os.path.basename(cu)}.sm_{sm}.cubin")
        t0 = time.perf_counter()
        proc = run([tools["ptxas"], "-v", "-O3", f"-arch=sm_{sm}", ptx_paths[(cu, v)], "-o", cubin])
        hmma = None
        err = None
        if proc.returncode != 0:
            err = f"ptxas {os.path.basename(cu)} sm_{sm} failed:\n{proc.stderr[-3000:]}"
        elif cu in tc_files:
            sass = run([tools["cuobjdump"], "-sass", cubin], env=sass_env)
            if sass.returncode != 0:
                err = f"cuobjdump -sass {os.path.basename(cu)} sm_{sm} failed: {sass.stderr.strip()[-500:]}"
            else:
                hmma = count_hmma(sass.stdout)
        return cu, sm, proc, hmma, err, time.perf_counter() - t0

    compiled = []
    shared = {sm: twin for sm, twin in SAME_PTXAS_OUTPUT.items() if not every_target and sm in sms and twin in sms}
    todo = [(cu, sm) for cu in cus for sm in sms if (cu, ARCHS[sm].ptx) in ptx_paths and sm not in shared]
    ptx_cache = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for cu, sm, proc, hmma, err, secs in pool.map(lambda a: back(*a), todo):
            timings["ptxas"][f"{os.path.basename(cu)} sm_{sm}"] = round(secs, 1)
            if err:
                errors.append(err)
                continue
            key = ptx_paths[(cu, ARCHS[sm].ptx)]
            if key not in ptx_cache:
                with open(key) as f:
                    ptx_cache[key] = parse_ptx(f.read())
            compiled.append(Compiled(cu, sm, ptx_cache[key], parse_ptxas(proc.stderr + proc.stdout), hmma, secs))
    for sm, twin in shared.items():
        compiled += [dataclasses.replace(c, sm=sm, seconds=0.0) for c in compiled if c.sm == twin]
    return compiled, errors, timings


def find_extension() -> str | None:
    found = sorted(glob.glob(os.path.join(ROOT, "pyext", "torchnova", "_C.*.so")))
    if found:
        return found[0]
    try:
        import importlib.util

        spec = importlib.util.find_spec("torchnova._C")
        return spec.origin if spec else None
    except (ImportError, ValueError):
        return None


def extension_smem_fn() -> SmemFn:
    sys.path.insert(0, os.path.join(ROOT, "pyext"))
    from torchnova import _ext  # noqa: PLC0415

    if not _ext.HAS_CPP:
        raise SystemExit(f"[cuda-build-report] torchnova._C does not import ({_ext.CPP_IMPORT_ERROR}); the dynamic "
                         "shared memory of the launches comes from it (torchnova._C.cuda_shared_memory_bytes)")

    def fn(kernel: str, frames: int, head_dim: int) -> int:
        need = int(_ext._C.cuda_shared_memory_bytes(kernel, int(frames), int(head_dim)))
        if need < 0:
            raise ValueError(f"no shared-memory plan for {kernel} at T={frames}, D={head_dim}")
        return need

    return fn


# -------------------------------------------------------------------------------------------------------------
# The report
# -------------------------------------------------------------------------------------------------------------


def build_rows(compiled: list[Compiled], tc_kernels: dict[str, set[str]], smem: SmemFn,
               names: dict[str, str]) -> tuple[list[Row], list[str]]:
    rows, errors = [], []
    for c in compiled:
        arch = ARCHS[c.sm]
        file = os.path.basename(c.cu)
        for mangled, entry in sorted(c.ptxas.items(), key=lambda kv: names.get(kv[0], kv[0])):
            ptx = c.ptx.get(mangled)
            base, targs = split_kernel_name(names.get(mangled, mangled))
            if ptx is None:
                errors.append(f"sm_{c.sm} {base}: in ptxas' output but not in the PTX")
                continue
            launches, why = launches_of(base, targs, ptx, arch, smem)
            if why:
                errors.append(f"sm_{c.sm} {base}<{short_targs(targs)}>: {why}")
                continue
            is_tc = base in tc_kernels.get(c.cu, set())
            hmma = c.hmma.get(mangled, 0) if c.hmma is not None else None
            for launch in launches:
                occ = occupancy(arch, launch.threads, entry.regs, entry.smem + launch.dynamic)
                rows.append(Row(file, base, targs, c.sm, launch.label, launch.threads, entry.regs, entry.stack,
                                entry.spill_stores, entry.spill_loads, entry.smem, launch.dynamic, arch.smem_optin,
                                launch.allowed, occ.blocks_per_sm, occ.warps_per_sm, occ.occupancy, occ.limiter,
                                is_tc, hmma, launch.note))
    return rows, errors


def check_extension(so: str, compiled: list[Compiled], tools: dict, names: dict[str, str]) -> tuple[list[str], dict]:
    """Registers, stack and static shared memory of the .so's cubins must equal this compile's (matched by the
    demangled name: the anonymous-namespace tag in the mangled name differs between compiles)."""
    proc = run([tools["cuobjdump"], "-res-usage", so])
    if proc.returncode != 0:
        return [f"cuobjdump -res-usage {so} failed: {proc.stderr.strip()[-500:]}"], {}
    usage = parse_res_usage(proc.stdout)
    so_names = demangle({n for per in usage.values() for n in per})
    anon = re.compile(r"_GLOBAL__N__\w+?_\d+_\w+?_cu_[0-9a-f]+_\d+")

    def key(demangled: str) -> str:
        return anon.sub("", demangled)

    ptx = run([tools["cuobjdump"], "-lptx", so])
    ptx_archs = sorted(set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx.stdout)))
    errors, summary = [], {"path": os.path.relpath(so, ROOT), "arches": sorted(usage), "ptx": ptx_archs,
                           "checked": 0}
    for c in compiled:
        if c.sm not in usage:
            continue
        by_name = {key(so_names[n]): u for n, u in usage[c.sm].items()}
        for mangled, e in c.ptxas.items():
            name = key(names.get(mangled, mangled))
            u = by_name.get(name)
            base, targs = split_kernel_name(name)
            if u is None:
                errors.append(f"sm_{c.sm} {base}<{short_targs(targs)}>: not in {os.path.basename(so)} (stale build?)")
                continue
            summary["checked"] += 1
            # sm_90+ cubins carry the system's 1 KiB of shared memory per block in SHARED; ptxas -v does not.
            reserved = ARCHS[c.sm].smem_reserved_per_block if c.sm >= 90 else 0
            if (u.regs, u.stack) != (e.regs, e.stack) or u.shared not in (e.smem, e.smem + reserved):
                errors.append(f"sm_{c.sm} {base}<{short_targs(targs)}>: the .so has {u.regs} registers, {u.stack} B "
                              f"stack, {u.shared} B shared; this compile {e.regs}, {e.stack}, {e.smem} (stale build, "
                              "or setup.py's flags and nvcc_command() differ)")
    return errors, summary


def format_table(rows: list[Row]) -> str:
    header = ("sm", "file", "kernel", "config", "thr", "regs", "spill st/ld", "stack", "static", "dynamic",
              "limit", "blk/SM", "warps/SM", "occ", "limiter", "HMMA")
    lines = []
    for r in rows:
        total = r.static_smem + r.dynamic_smem
        lines.append((
            f"sm_{r.sm}", r.file.replace(".cu", ""), f"{r.kernel}<{short_targs(r.targs)}>", r.config or "-",
            str(r.threads), str(r.regs), f"{r.spill_stores}/{r.spill_loads}", str(r.stack), str(r.static_smem),
            str(r.dynamic_smem), ("" if r.allowed else "excluded ") + f"{total}/{r.smem_limit}",
            str(r.blocks_per_sm), str(r.warps_per_sm), f"{100 * r.occupancy:.0f}%", r.limiter,
            "-" if not r.tensor_core else str(r.hmma),
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'>' if i in (4, 5, 7, 8, 9, 11, 12, 13) else '<'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines])


def _config_order(config: str) -> tuple:
    """T=16 < T=32 < T=97 < T=128 (numbers as numbers)."""
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", config))


def format_markdown(rows: list[Row]) -> str:
    """The condensed table of docs/gpu_build_report.md: one line per kernel instantiation and launch
    configuration, one cell per target: registers, static + dynamic shared memory, theoretical occupancy (and the
    spill, the configuration where it differs from the first target's, "excluded" where the reasons exclude it)."""
    sms = sorted({r.sm for r in rows})
    groups: dict[tuple, dict[int, Row]] = {}
    for r in sorted(rows, key=lambda r: (r.file, r.kernel, short_targs(r.targs), _config_order(r.config))):
        groups.setdefault((r.file, r.kernel, r.targs, r.config), {})[r.sm] = r
    lines = ["| kernel | config | threads | " + " | ".join(f"sm_{sm}" for sm in sms) + " |",
             "|---|---|---|" + "---|" * len(sms)]
    for (file, kernel, targs, _), by_sm in groups.items():
        first = by_sm[min(by_sm)]
        cells = []
        for sm in sms:
            r = by_sm.get(sm)
            if r is None:
                cells.append("")
                continue
            total = r.static_smem + r.dynamic_smem
            cell = f"{r.regs} r, {total / 1024:.1f} KiB, {100 * r.occupancy:.0f}%"
            if r.spill_stores or r.spill_loads:
                cell += f", spill {r.spill_stores}/{r.spill_loads} B"
            if r.threads != first.threads:
                cell += f" ({r.threads} thr)"
            if not r.allowed:
                cell = f"excluded ({total / 1024:.1f} KiB)"
            if r.tensor_core:
                cell += f", HMMA {r.hmma}"
            cells.append(cell)
        lines.append(f"| `{kernel}<{short_targs(targs)}>` | {first.config or '-'} | {first.threads} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,86,89,90,120", help="targets, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the JSON report ('' for nowhere)")
    parser.add_argument("--so", default="auto", help="the built extension to cross-check ('none' to skip)")
    parser.add_argument("--files", default="", help="only these csrc/cuda/*.cu (comma-separated basenames)")
    parser.add_argument("--quiet", action="store_true", help="print the summary and failures, not the table")
    parser.add_argument("--markdown", default="", help="also write the condensed Markdown table to this file")
    parser.add_argument("--every-target", action="store_true",
                        help="run ptxas for sm_89 too, instead of reporting sm_86's output for it (SAME_PTXAS_OUTPUT)")
    parser.add_argument("--keep", default="", help="keep the PTX and cubins in this folder (to read their SASS)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    sms = [int(a) for a in args.arch.split(",") if a.strip()]
    unknown = [sm for sm in sms if sm not in ARCHS]
    if unknown:
        parser.error(f"--arch: unknown targets {unknown}; known: {sorted(ARCHS)}")

    tools = {t: find_tool(t) for t in ("nvcc", "ptxas", "cuobjdump", "nvdisasm")}
    if tools["nvcc"] and not tools["ptxas"]:
        tools["ptxas"] = os.path.join(os.path.dirname(tools["nvcc"]), "ptxas")
    missing = [t for t, p in tools.items() if not p]
    if missing:
        print(f"[cuda-build-report] missing tools: {missing} (nvcc/ptxas: CUDA_HOME; cuobjdump/nvdisasm: the pinned "
              "nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm of scripts/setup.sh)")
        return 1
    if not os.environ.get("CUDA_HOME"):  # torch.utils.cpp_extension's include paths (read when torch is imported)
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(tools["nvcc"])))
    versions = {t: (run([p, "--version"]).stdout.strip().splitlines() or ["?"])[-1] for t, p in tools.items()}
    print(f"[cuda-build-report] tools: " + "; ".join(f"{t} {tools[t]} ({versions[t]})" for t in tools))

    cus = sorted(glob.glob(os.path.join(CUDA_SOURCES, "*.cu")))
    if args.files:
        wanted = {f.strip() for f in args.files.split(",")}
        cus = [c for c in cus if os.path.basename(c) in wanted]
    tc_kernels = {}
    for cu in cus:
        kernels, tc = tensor_core_kernels(cu)
        tc_kernels[cu] = tc
    tc_files = {cu for cu, tc in tc_kernels.items() if tc}
    smem = extension_smem_fn()

    with tempfile.TemporaryDirectory(prefix="torchnova-cuda-report-") as tmp:
        workdir = args.keep or tmp
        os.makedirs(workdir, exist_ok=True)
        compiled, errors, timings = compile_all(cus, sms, args.jobs, tools, workdir, tc_files,
                                                every_target=args.every_target)
    names = demangle({m for c in compiled for m in c.ptxas})
    rows, row_errors = build_rows(compiled, tc_kernels, smem, names)
    errors += row_errors
    kernels = {(r.file, r.kernel, r.targs) for r in rows}
    errors += report_errors(rows)

    so_summary = None
    so = find_extension() if args.so == "auto" else (None if args.so == "none" else args.so)
    if so:
        so_errors, so_summary = check_extension(so, compiled, tools, names)
        errors += so_errors
        if so_summary.get("arches"):
            runs_on = {sm: max((a for a in so_summary["arches"] if a // 10 == sm // 10 and a <= sm), default=None)
                       for sm in sms}
            print(f"[cuda-build-report] {os.path.relpath(so, ROOT)}: cubins for sm_{so_summary['arches']}, PTX "
                  f"{so_summary['ptx'] or 'none'}; " + ", ".join(
                      f"sm_{sm} runs " + (f"the sm_{a} cubin" if a else "PTX JIT" if any(
                          int(re.sub(r"\D", "", p)) <= sm for p in so_summary["ptx"]) else
                                          "NOTHING (no cubin of its major version, no PTX: rebuild for it)")
                      for sm, a in runs_on.items()))
        if so_summary.get("checked", 0) == 0 and not so_errors:
            print(f"[cuda-build-report] {so}: no sm_{sms} cubins to cross-check (a build without CUDA kernels)")
    elif args.so == "auto":
        print("[cuda-build-report] no built extension found: the .so cross-check is skipped")

    if not args.quiet:
        print(format_table(rows))
    elapsed = time.perf_counter() - t0
    tc_names = sorted({k for tc in tc_kernels.values() for k in tc})
    print(f"[cuda-build-report] {len(kernels)} kernel instantiations in {len(cus)} files, {len(rows)} rows over "
          f"sm_{', sm_'.join(map(str, sms))}; tensor-core kernels: {', '.join(tc_names) or 'none'}; "
          f"spilling rows: {sum(1 for r in rows if r.spill_stores or r.spill_loads)}; "
          f".so cross-check: {so_summary['checked'] if so_summary else 'skipped'} kernels; {elapsed:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"tools": versions, "arches": {sm: dataclasses.asdict(ARCHS[sm]) for sm in sms},
                       "seconds": round(elapsed, 1), "timings": timings, "extension": so_summary,
                       "tensor_core_kernels": tc_names, "errors": errors,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
        print(f"[cuda-build-report] wrote {os.path.relpath(args.json, os.getcwd())}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows) + "\n")
    for e in errors:
        print(f"[cuda-build-report] FAIL {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
