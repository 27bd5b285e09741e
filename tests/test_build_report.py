"""scripts/cuda_build_report.py: the parsing of ptxas / cuobjdump / PTX output and the occupancy arithmetic on
fixed samples with known answers, the failure conditions, and (skipped without nvcc / cuobjdump) one real compile
of a tensor-core kernel and of its negative twin."""

import importlib.util
import os
import shutil
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_build_report", os.path.join(ROOT, "scripts", "cuda_build_report.py"))
report = importlib.util.module_from_spec(_spec)
sys.modules["cuda_build_report"] = report  # dataclasses look their module up
_spec.loader.exec_module(report)

SM80, SM86, SM89, SM90, SM120 = (report.ARCHS[a] for a in (80, 86, 89, 90, 120))

# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------

PTXAS_SAMPLE = """\
ptxas info    : 28 bytes gmem, 224 bytes cmem[4]
ptxas info    : Compiling entry function '_Z7kernel1Pf' for 'sm_86'
ptxas info    : Function properties for _Z7kernel1Pf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size, 584 bytes cmem[0]
ptxas info    : Compile time = 73.069 ms
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function '_Z7kernel2Pf' for 'sm_86'
ptxas info    : Function properties for _Z7kernel2Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4224 bytes smem, 380 bytes cmem[0]
"""


def test_parse_ptxas():
    entries = report.parse_ptxas(PTXAS_SAMPLE)
    assert set(entries) == {"_Z7kernel1Pf", "_Z7kernel2Pf"}  # the non-entry helper's block is not an entry
    k1, k2 = entries["_Z7kernel1Pf"], entries["_Z7kernel2Pf"]
    assert (k1.regs, k1.stack, k1.spill_stores, k1.spill_loads, k1.smem) == (128, 8, 4, 4, 0)
    assert (k2.regs, k2.stack, k2.spill_stores, k2.spill_loads, k2.smem) == (40, 0, 0, 0, 4224)


RES_USAGE_SAMPLE = """\

Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z7kernel1Pf:
  REG:128 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Function _Z7kernel1Pf:
  REG:120 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_res_usage():
    usage = report.parse_res_usage(RES_USAGE_SAMPLE)
    assert set(usage) == {80, 90}
    assert usage[80]["_Z7kernel1Pf"] == report.ResUsage(regs=128, stack=8, shared=0, local=0)
    assert usage[90]["_Z7kernel1Pf"] == report.ResUsage(regs=120, stack=0, shared=1024, local=0)


SASS_SAMPLE = """\
\tcode for sm_90
\t\tFunction : _Z6tc_fwdPf
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0100*/                   LDSM.16.M88.4 R8, [R2] ;
        /*0110*/                   HMMA.16816.F32.BF16 R12, R8, R4, R12 ;
        /*0120*/                   HMMA.16816.F32.BF16 R16, R8, R6, R16 ;
        /*0130*/                   EXIT ;
\t\tFunction : _Z4simtPf
        /*0100*/                   FFMA R2, R3, R4, R2 ;
        /*0110*/                   EXIT ;
"""


def test_count_hmma():
    assert report.count_hmma(SASS_SAMPLE) == {"_Z6tc_fwdPf": 2, "_Z4simtPf": 0}


PTX_SAMPLE = """\
.extern .shared .align 16 .b8 _ZN9torchnova4smemE[];

.entry _Z4dynPf(
\t.param .u64 _Z4dynPf_param_0
)
.maxntid 128, 1, 1
{
\t.reg .b32 %r<4>;
\tmov.u64 %rd1, _ZN9torchnova4smemE;
\t{ .reg .b32 t; mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1,%f2,%f3,%f4}, {%r1,%r2,%r3,%r4}, {%r5,%r6}, {%f1,%f2,%f3,%f4}; }
\tret;
}

.visible .entry _Z6staticPf(
\t.param .u64 _Z6staticPf_param_0
)
{
\tret;
}
"""


def test_parse_ptx():
    entries = report.parse_ptx(PTX_SAMPLE)
    dyn, static = entries["_Z4dynPf"], entries["_Z6staticPf"]
    assert (dyn.maxntid, dyn.dynamic_smem, dyn.mma) == (128, True, 1)
    assert (static.maxntid, static.dynamic_smem, static.mma) == (None, False, 0)


@pytest.mark.parametrize(
    "demangled, base, targs",
    [
        ("void torchnova::(anonymous namespace)::spatial_fwd_kernel<c10::Half, 64>(c10::Half const*, int)",
         "spatial_fwd_kernel", "c10::Half, 64"),
        ("void torchnova::(anonymous namespace)::spatial_delta_kernel<float>(float const*)", "spatial_delta_kernel",
         "float"),
        ("void torchnova::plain_kernel(float*)", "plain_kernel", ""),
        ("void mesa_kl_fwd_kernel<c10::BFloat16, 8>(Args<c10::BFloat16>)", "mesa_kl_fwd_kernel", "c10::BFloat16, 8"),
    ],
)
def test_split_kernel_name(demangled, base, targs):
    assert report.split_kernel_name(demangled) == (base, targs)
    assert report.short_targs("c10::BFloat16, 128") == "bf16,128"


# ---------------------------------------------------------------------------------------------------------
# Occupancy: known answers from the occupancy calculator's rules
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, threads, regs, smem, blocks, warps, limiter",
    [
        # 96 regs x 32 = 3072 per warp; 16384 per sub-partition / 3072 = 5 warps, x 4 = 20; 128 threads = 4 warps
        (SM80, 128, 96, 0, 5, 20, "registers"),
        # 168 regs: 5376 per warp (a multiple of 256); 3 warps per sub-partition = 12 per SM < 2 blocks of 8 warps
        (SM86, 256, 168, 0, 1, 8, "registers"),
        # 33 regs round up to 1280 per warp (not 1056): 12 per sub-partition = 48 warps = sm_86's max warps (a tie)
        (SM86, 256, 33, 0, 6, 48, "registers+warps"),
        # shared memory: 66048 + 1024 reserved = 67072 (a multiple of 128); 167936 / 67072 = 2 blocks
        (SM80, 128, 32, 66048, 2, 8, "shared memory"),
        # sm_90's whole opt-in 227 KiB + 1 KiB reserved = 228 KiB = one block per SM
        (SM90, 128, 64, 232448, 1, 4, "shared memory"),
        # the 99 KiB cards: 2 x (49536 + 1024 -> 50560) = 101120 <= 102400
        (SM89, 128, 64, 49536, 2, 8, "shared memory"),
        # tiny blocks: sm_86 keeps 16 blocks per SM (16 warps of 48), sm_89 24, sm_120 32
        (SM86, 32, 16, 0, 16, 16, "blocks"),
        (SM89, 32, 16, 0, 24, 24, "blocks"),
        (SM120, 32, 16, 0, 32, 32, "blocks"),
        # warps: 1024 threads = 32 warps; sm_80 fits 2 (64 warps), sm_86 1 (48)
        (SM80, 1024, 32, 0, 2, 64, "registers+warps"),  # 32 regs x 1024 threads: 2 blocks fill 64K too
        (SM86, 1024, 32, 0, 1, 32, "warps"),
    ],
)
def test_occupancy_known_answers(arch, threads, regs, smem, blocks, warps, limiter):
    occ = report.occupancy(arch, threads, regs, smem)
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.limiter) == (blocks, warps, limiter)
    assert occ.occupancy == pytest.approx(warps / arch.max_warps)


@pytest.mark.parametrize(
    "arch, threads, regs, smem, why",
    [
        (SM80, 1024, 128, 0, "registers"),  # 4096 per warp x 32 warps = 131072 > 65536 per block
        (SM80, 128, 256, 0, "registers"),  # over 255 per thread
        (SM86, 128, 32, 99 * 1024 + 1, "shared memory"),  # over the 99 KiB opt-in
        (SM80, 128, 32, 163 * 1024 + 1, "shared memory"),
        (SM90, 128, 32, 227 * 1024 + 1, "shared memory"),
    ],
)
def test_occupancy_cannot_launch(arch, threads, regs, smem, why):
    occ = report.occupancy(arch, threads, regs, smem)
    assert occ.blocks_per_sm == 0 and occ.limiter == f"cannot launch ({why})"


# ---------------------------------------------------------------------------------------------------------
# Failure conditions
# ---------------------------------------------------------------------------------------------------------


def _row(**kw):
    base = dict(file="x.cu", kernel="k", targs="float, 64", sm=86, config="", threads=128, regs=64, stack=0,
                spill_stores=0, spill_loads=0, static_smem=0, dynamic_smem=0, smem_limit=SM86.smem_optin,
                allowed=True, blocks_per_sm=4, warps_per_sm=16, occupancy=1 / 3, limiter="registers",
                tensor_core=False, hmma=None)
    base.update(kw)
    return report.Row(**base)


def test_clean_row_passes():
    assert report.check_row(_row()) == []


def test_unexplained_spill_fails(monkeypatch):
    monkeypatch.setattr(report, "SPILL_ALLOWLIST", {})
    (error,) = report.check_row(_row(spill_stores=4, spill_loads=4, stack=8))
    assert "SPILL_ALLOWLIST" in error and "k<fp32,64>" in error


def test_explained_spill_passes_up_to_its_limit(monkeypatch):
    monkeypatch.setattr(report, "SPILL_ALLOWLIST", {("k", r"\w+,64", (86, 89)): (8, "why")})
    assert report.check_row(_row(spill_stores=8, spill_loads=4)) == []
    (error,) = report.check_row(_row(spill_stores=12, spill_loads=4))
    assert "over its allowance of 8 B" in error
    assert report.check_row(_row(sm=80, spill_stores=4, spill_loads=4))  # the allowance is for sm_86 only
    assert report.check_row(_row(targs="float, 128", spill_stores=4, spill_loads=4))  # and for the 64 bucket


def test_shared_memory_over_the_limit_fails_only_where_allowed():
    over = dict(static_smem=4096, dynamic_smem=SM86.smem_optin - 4095, blocks_per_sm=0)
    (error,) = report.check_row(_row(**over))
    assert "static" in error and "101376" in error
    assert report.check_row(_row(**over, allowed=False)) == []  # the reasons exclude it: not launched


def test_configuration_that_cannot_launch_fails():
    (error,) = report.check_row(_row(regs=128, threads=1024, blocks_per_sm=0, limiter="cannot launch (registers)"))
    assert "cannot launch" in error


def test_tensor_core_kernel_needs_hmma():
    (error,) = report.check_row(_row(tensor_core=True, hmma=0))
    assert "HMMA" in error
    assert report.check_row(_row(tensor_core=True, hmma=32)) == []
    assert report.check_row(_row(tensor_core=False, hmma=None)) == []


def test_no_kernel_fails():
    assert report.report_errors([]) == ["no CUDA kernel found: a report about nothing cannot pass"]
    assert report.report_errors([_row()]) == []


def _smem(kernel, frames, head_dim):  # the shapes of shared_memory_plan.h, small enough to check by hand
    return {"fwd": 1000 * head_dim, "bwd": 2000 * head_dim, "tfwd": 1000 * frames}[kernel]


def test_launches_need_a_plan_or_no_dynamic_shared_memory():
    ptx = report.PtxEntry("_Z1kv", maxntid=256, dynamic_smem=False, mma=0)
    assert report.launches_of("k", "", ptx, SM80, _smem) == ([report.Launch("", 256, 0, True)], None)
    launches, why = report.launches_of("k", "", report.PtxEntry("_Z1kv", 256, True, 0), SM80, _smem)
    assert launches == [] and "LAUNCH_PLANS" in why
    launches, why = report.launches_of("k", "", report.PtxEntry("_Z1kv", None, False, 0), SM80, _smem)
    assert launches == [] and "__launch_bounds__" in why


def test_bucket_plan_takes_the_largest_allowed_head_dim():
    # bwd needs 2000 * D: on 99 KiB (101376) the 64 bucket fits up to D = 50, the 128 bucket not at all
    (launch,) = report._bucket_launches("float, 64", 128, SM86, _smem, "fwd", ("fwd", "bwd"))
    assert (launch.label, launch.dynamic, launch.allowed) == ("D=50 (D 51-64 excluded)", 50_000, True)
    (launch,) = report._bucket_launches("float, 128", 128, SM86, _smem, "fwd", ("fwd", "bwd"))
    assert not launch.allowed
    (launch,) = report._bucket_launches("float, 64", 128, SM90, _smem, "fwd", ("fwd", "bwd"))
    assert (launch.label, launch.dynamic) == ("D=64", 64_000)


def test_temporal_plan_fits_warps_to_the_limit():
    launches = report._temporal_launches("tfwd", ("tfwd",))("float", 128, SM86, _smem)
    by_t = {launch.label: launch for launch in launches}
    assert list(by_t) == ["T=16", "T=32", "T=64", "T=101", "T=128"]  # 101 = the largest T that fits 101376
    assert (by_t["T=16"].threads, by_t["T=16"].dynamic) == (128, 64_000)  # 4 warps x 16000
    assert (by_t["T=64"].threads, by_t["T=64"].dynamic) == (32, 64_000)  # 101376 // 64000 = 1 warp
    assert by_t["T=101"].allowed and not by_t["T=128"].allowed


# ---------------------------------------------------------------------------------------------------------
# Tensor-core kernels in the source
# ---------------------------------------------------------------------------------------------------------

TC_SOURCE = textwrap.dedent("""\
    // A kernel that reaches tc::mma_* through a helper is a tensor-core kernel; one that does not is not.
    #include "cuda/tensor_core.cuh"
    namespace torchnova {
    namespace {
    struct Tile { int rows; };
    __device__ __forceinline__ void tile_mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
      tc::mma_m16n8k16_bf16(d, a, b, d);  // "tc::mma_ in a comment or string does not count"
    }
    template <typename T>
    __global__ void __launch_bounds__(32) tc_kernel(const uint32_t* __restrict__ a, float* out) {
      float d[4] = {0, 0, 0, 0};
      uint32_t b[2] = {a[4], a[5]};
      tile_mma(d, a, b);
      if (threadIdx.x == 0) { out[0] = d[0]; }
    }
    __global__ void __launch_bounds__(64) simt_kernel(float* out) {  // mentions tc::mma_m16n8k16_bf16 only here
      out[threadIdx.x] = 1.0f;
    }
    }  // namespace
    void launch(const uint32_t* a, float* out) {
      tc_kernel<float><<<1, 32>>>(a, out);
      simt_kernel<<<1, 64>>>(out);
    }
    }  // namespace torchnova
    """)


def test_tensor_core_kernels_from_the_source(tmp_path):
    cu = tmp_path / "tc_sample.cu"
    cu.write_text(TC_SOURCE)
    kernels, tc = report.tensor_core_kernels(str(cu))
    assert kernels == {"tc_kernel", "simt_kernel"}
    assert tc == {"tc_kernel"}


def test_the_repository_has_kernels():
    """The source scan finds every __global__ of csrc/cuda (a scan that finds nothing would pass anything)."""
    found = {}
    for cu in sorted(os.listdir(os.path.join(ROOT, "csrc", "cuda"))):
        if cu.endswith(".cu"):
            found[cu] = report.tensor_core_kernels(os.path.join(ROOT, "csrc", "cuda", cu))[0]
    assert "spatial_fwd_kernel" in found["spacetime_spatial.cu"]
    assert "temporal_bwd_kernel" in found["spacetime_temporal.cu"]
    assert "cogvideo_attention_bwd_dq_kernel" in found["dual_channel_attention.cu"]
    assert all(found.values()), found


# ---------------------------------------------------------------------------------------------------------
# One real compile (nvcc, ptxas, cuobjdump + nvdisasm): HMMA found in the tensor-core kernel, and a tensor-core
# kernel whose mma the compiler removes fails the report.
# ---------------------------------------------------------------------------------------------------------

_TOOLS = {t: report.find_tool(t) for t in ("nvcc", "ptxas", "cuobjdump", "nvdisasm")}
needs_cuda_tools = pytest.mark.skipif(not all(_TOOLS.values()) or shutil.which("c++filt") is None,
                                      reason=f"needs nvcc, ptxas, cuobjdump, nvdisasm, c++filt: {_TOOLS}")


@needs_cuda_tools
def test_real_compile_finds_hmma_and_fails_without_it(tmp_path):
    cu = tmp_path / "tc_sample.cu"
    # The negative twin: the mma sits behind a branch the compiler proves dead, so no HMMA is emitted.
    dead = TC_SOURCE.replace("tile_mma(d, a, b);", "if (sizeof(T) == 3) tile_mma(d, a, b);")
    cu_dead = tmp_path / "tc_dead.cu"
    cu.write_text(TC_SOURCE)
    cu_dead.write_text(dead)
    tc_kernels = {str(p): report.tensor_core_kernels(str(p))[1] for p in (cu, cu_dead)}
    assert tc_kernels[str(cu_dead)] == {"tc_kernel"}  # the source still calls it
    compiled, errors, _ = report.compile_all([str(cu), str(cu_dead)], [80, 90], 2, _TOOLS, str(tmp_path),
                                             set(tc_kernels), log=lambda *_: None)
    assert errors == []
    names = report.demangle({m for c in compiled for m in c.ptxas})
    rows, errors = report.build_rows(compiled, tc_kernels, _smem, names)
    assert errors == []
    by = {(r.file, r.kernel, r.sm): r for r in rows}
    assert len(by) == 8
    for sm in (80, 90):
        good, simt, bad = by[("tc_sample.cu", "tc_kernel", sm)], by[("tc_sample.cu", "simt_kernel", sm)], \
            by[("tc_dead.cu", "tc_kernel", sm)]
        assert good.tensor_core and good.hmma >= 1 and good.threads == 32 and good.regs > 0
        assert not simt.tensor_core and simt.threads == 64
        assert bad.tensor_core and bad.hmma == 0
        assert report.check_row(good) == [] and report.check_row(simt) == []
        assert "without HMMA" in report.check_row(bad)[0]
        assert good.blocks_per_sm == report.occupancy(report.ARCHS[sm], 32, good.regs, good.static_smem).blocks_per_sm


def test_targets_agree_with_the_backend_and_the_triton_check():
    """One set of per-block limits for every GPU kernel: the Python reasons' and the Triton compile check's."""
    from torchnova import _backend

    assert report.ARCHS[80].smem_optin == _backend.SHARED_MEMORY_SM80
    assert report.ARCHS[90].smem_optin == _backend.SHARED_MEMORY_SM90
    for sm in (86, 89, 120):
        assert report.ARCHS[sm].smem_optin == _backend.SHARED_MEMORY_SM86


@needs_cuda_tools
def test_sm89_reports_sm86_ptxas_unless_every_target(tmp_path):
    cu = tmp_path / "tc_sample.cu"
    cu.write_text(TC_SOURCE)
    compiled, errors, timings = report.compile_all([str(cu)], [86, 89], 1, _TOOLS, str(tmp_path), {str(cu)},
                                                   log=lambda *_: None)
    assert errors == [] and sorted(c.sm for c in compiled) == [86, 89]
    assert list(timings["ptxas"]) == ["tc_sample.cu sm_86"]  # one ptxas run
    c86, c89 = sorted(compiled, key=lambda c: c.sm)
    assert c86.ptxas == c89.ptxas and c89.hmma == c86.hmma


def test_every_spill_allowance_is_well_formed():
    # A target written as a bare int (90 instead of (90,)) crashed the report's checks after every compile had run.
    targets = set(report.ARCHS)
    for (kernel, targs, archs), (limit, why) in report.SPILL_ALLOWLIST.items():
        assert archs is None or (isinstance(archs, tuple) and set(archs) <= targets), (kernel, targs, archs)
        assert targs is None or isinstance(targs, str), (kernel, targs)
        assert isinstance(limit, int) and limit > 0 and why, (kernel, targs, archs)
