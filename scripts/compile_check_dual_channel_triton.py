"""Compile the dual-channel Triton kernels for real GPU targets on a machine without a GPU.

    PYTHONPATH=pyext python scripts/compile_check_dual_channel_triton.py [--arch 80,86,90] [--quick]

Runs Triton's whole pipeline (Python -> TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas shipped in the triton
wheel) for every attention kernel of pyext/torchnova/dual_channel/triton_kernels.py with the launch configs the
launchers use (``_config``: tile sizes and warps per kernel, head dim and dtype), every mode for D = 64 and the
heaviest mode (plus / window / interpolation) for D = 128 and 256, plus the delta, mix and tile-list kernels.
Prints one line per attention kernel with the cubin's registers, stack (register spills) and shared memory, and
exits 1 if anything fails to compile or needs more shared memory than a block of that arch can have (99 KB on
sm_86 / sm_89, 163 KB on sm_80, 227 KB on sm_90).
This catches what the interpreter cannot (type errors of the compiled frontend, layouts, shared memory); it
says nothing about speed. Uses Triton's compiler API (ASTSource / GPUTarget, triton >= 3.3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "pyext"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from torchnova.dual_channel import triton_kernels as tk  # noqa: E402

MODES = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]  # (CHANNEL, ATTENTION, STAGE) codes
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, opt-in


def arg_types(dtype: str):
    def types(name: str) -> str:
        if name.endswith("_ptr"):
            special = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "pad_ptr": "*u8", "list_ptr": "*i32",
                       "count_ptr": "*i32", "d_alpha_partial_ptr": "*fp32", "alpha_logit_ptr": "*fp32"}
            return special.get(name, "*" + dtype)
        return "fp32" if name in ("qk_scale", "scale") else "i32"

    return types


def compile_kernel(kernel, dtype: str, constexprs: dict, arch: int, options: dict | None = None):
    signature = {name: "constexpr" if name in constexprs else arg_types(dtype)(name) for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options or dict(num_warps=4))


def try_compile(failures: list, name: str, kernel, dtype: str, constexprs: dict, arch: int, options=None):
    """The compiled kernel, or None after printing the error and recording ``name`` in failures."""
    try:
        return compile_kernel(kernel, dtype, constexprs, arch, options)
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
        failures.append(name)
        print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        return None


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return ""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(field for line in out.splitlines() if "REG" in line for field in line.split()[:2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,86,90", help="comma-separated compute capabilities (default 80,86,90)")
    parser.add_argument("--quick", action="store_true", help="fp16 and D = 64 only")
    options = parser.parse_args()
    kernels = (tk._cogvideo_fwd_kernel, tk._cogvideo_bwd_dkdv_kernel, tk._cogvideo_bwd_dq_kernel)
    failures = []
    for arch in (int(a) for a in options.arch.split(",")):
        for dtype in ("fp16",) if options.quick else DTYPES:
            for head_dim in (64,) if options.quick else (64, 128, 256):
                for mode in MODES if head_dim == 64 else MODES[-1:]:
                    for kind, kernel in enumerate(kernels):
                        config = tk._config(kind, head_dim, DTYPES[dtype])
                        launch = dict(num_warps=config.pop("num_warps"), num_stages=config.pop("num_stages"))
                        constexprs = dict(CHANNEL=mode[0], ATTENTION=mode[1], STAGE=mode[2], HAS_PAD=True,
                                          IEEE=dtype == "fp32", **config)  # fmt: skip
                        name = f"sm_{arch} {dtype} D={head_dim} mode={mode} {kernel.__name__}"
                        compiled = try_compile(failures, name, kernel, dtype, constexprs, arch, launch)
                        if compiled is None:
                            continue
                        shared = compiled.metadata.shared
                        print(f"{name}: tiles {config['BLOCK_M']}x{config['BLOCK_N']} warps {launch['num_warps']} "
                              f"stages {launch['num_stages']} "
                              f"{resource_usage(compiled)} shared {shared}")  # fmt: skip
                        if shared > SHARED_LIMIT.get(arch, 99 * 1024):
                            failures.append(name + " (shared memory)")
            others = [
                (tk._cogvideo_bwd_delta_kernel, dict(BLOCK_M=32, D_PAD=64)),
                (tk._mix_fwd_kernel, dict(BLOCK_R=tk.MIX_BLOCK_R, BLOCK_C=tk.MIX_BLOCK_C)),
                (tk._mix_bwd_kernel, dict(BLOCK_R=tk.MIX_BLOCK_R, BLOCK_C=tk.MIX_BLOCK_C)),
                (tk._tile_list_kernel,
                 dict(CHANNEL=1, ATTENTION=1, STAGE=1, ROW_BLOCK=64, COL_BLOCK=32, ROWS_ARE_KEYS=True)),
            ]
            for kernel, constexprs in others:
                try_compile(failures, f"sm_{arch} {dtype} {kernel.__name__}", kernel, dtype, constexprs, arch)
    if failures:
        print(f"FAILED: {len(failures)}: {failures}")
        return 1
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
