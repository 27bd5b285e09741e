"""Build torchnova: pure-Python package under pyext/, plus one C++ extension ``torchnova._C`` from csrc/.

CPU kernels are always compiled. CUDA kernels are compiled when ``FORCE_CUDA=1``, or when a GPU is visible and
CUDA_HOME is set. Environment:
  FORCE_CUDA=1               build the CUDA kernels even without a visible GPU (needs nvcc + torch's CUDA build)
  TORCHNOVA_SKIP_CPP_BUILD=1 install the Python package only (reference and Triton backends)
  TORCH_CUDA_ARCH_LIST       e.g. "8.0;9.0" (default "8.0;8.6;8.9;9.0+PTX")
  MAX_JOBS                   parallel compile jobs (default: from cores and RAM, ~3 GB per nvcc job)
  NVCC_THREADS               nvcc --threads per job (default 2)
  DEBUG=1                    -O0 -g -lineinfo
  TORCHNOVA_CUDA_EMULATION=1 also build torchnova._C_cuda_emu, the test-only CUDA emulation layer: the CUDA kernels
                             compiled with g++ as host C++ (csrc/emulation, docs/cuda_emulation.md), for
                             torchnova.testing.cuda_emulation(). Needs no CUDA toolkit. Not for user installs.
  TORCHNOVA_EMULATION_ONLY=1 build only torchnova._C_cuda_emu, keeping the installed torchnova._C (for kernel work:
                             `python setup.py build_ext --inplace` then rebuilds just the emulated kernels)
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[torchnova setup] {msg}", file=sys.stderr)


def default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gb = 8
    return str(max(1, min(cores, int(ram_gb // 3))))


def cuda_decision(torch, cpp_extension) -> tuple[bool, str]:
    """(build CUDA?, why) — the reason is printed either way."""
    cuda_home = cpp_extension.CUDA_HOME
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if cuda_home is None:
        return False, "CUDA_HOME is not set and nvcc was not found"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, f"FORCE_CUDA=1 (CUDA_HOME={cuda_home}, torch CUDA {torch.version.cuda})"
    if torch.cuda.is_available():
        return True, f"a GPU is visible (CUDA_HOME={cuda_home})"
    return False, "no GPU is visible and FORCE_CUDA is not 1"


def nvidia_wheel_include_dirs() -> list[str]:
    """torch's CUDA wheels ship CUDA headers (cuBLAS, cuSPARSE, ...) under site-packages/nvidia/*/include.

    ATen's CUDA headers include them; a runtime-only CUDA toolkit lacks them, so add these folders.
    """
    dirs = []
    for path in sys.path:
        for pattern in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/*/include"):
            dirs.extend(d for d in glob.glob(os.path.join(path, pattern)) if os.path.isdir(d))
    seen, unique = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def extensions_and_cmdclass():
    if os.environ.get("TORCHNOVA_SKIP_CPP_BUILD", "0") == "1":
        log("TORCHNOVA_SKIP_CPP_BUILD=1: installing the Python package only (reference and Triton backends)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable in the build environment: skipping the C++ extension "
            "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}

    debug = os.environ.get("DEBUG", "0") == "1"
    if os.environ.get("TORCHNOVA_EMULATION_ONLY", "0") == "1":
        log("TORCHNOVA_EMULATION_ONLY=1: building only the CUDA emulation layer; torchnova._C is left as it is")
        return [cuda_emulation_extension(cpp_extension, debug)], cmdclass_for(cpp_extension)
    with_cuda, why = cuda_decision(torch, cpp_extension)
    os.environ.setdefault("MAX_JOBS", default_max_jobs())

    cpp_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    cpp_sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]

    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math lets GCC if-convert the branch-free exp and the p > 0 selects into SIMD code.
    cxx_flags = opt + ["-fopenmp", "-fno-trapping-math", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    extra_link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []

    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        arch_tag = "_".join(a.strip().replace(".", "").replace("+", "_") for a in arch_list.replace(" ", ";").split(";") if a.strip())
        nvcc_threads = os.environ.get("NVCC_THREADS", "2")
        nvcc_flags = opt + [
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            f"--threads={nvcc_threads}",
        ] + (["-lineinfo"] if debug else [])
        include_dirs += nvidia_wheel_include_dirs()
        define_macros += [("TORCHNOVA_WITH_CUDA", None), ("TORCHNOVA_CUDA_ARCHS", f"sm{arch_tag}")]
        log(f"building CPU + CUDA kernels: {why}; TORCH_CUDA_ARCH_LIST={arch_list}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']}, NVCC_THREADS={nvcc_threads}")
        ext = cpp_extension.CUDAExtension(
            name="torchnova._C",
            sources=cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
        )
    else:
        log(f"building CPU kernels only, no CUDA kernels: {why}. The cpp, reference and Triton backends "
            "are installed; the cuda backend will report this reason.")
        ext = cpp_extension.CppExtension(
            name="torchnova._C",
            sources=cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    exts = [ext]
    if os.environ.get("TORCHNOVA_CUDA_EMULATION", "0") == "1":
        exts.append(cuda_emulation_extension(cpp_extension, debug))
    return exts, cmdclass_for(cpp_extension)


def cmdclass_for(cpp_extension):
    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def cuda_emulation_extension(cpp_extension, debug: bool):
    """torchnova._C_cuda_emu: csrc/cuda/*.cu compiled by g++ through csrc/emulation/emu_*.cpp (each includes one .cu
    after the emulation header), with the shim headers (csrc/emulation/shim) standing in for the CUDA ones.
    -O1 keeps the compile short (the kernels run on tiny test shapes); -fsanitize=alignment,bounds checks 16-byte
    vector loads and indices into fixed-size arrays (static shared memory, register arrays), reported by the
    layer's own handlers (no libubsan needed)."""
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "emulation", "*.cpp")))]
    flags = (["-O0", "-g"] if debug else ["-O1", "-g0"]) + [
        "-std=c++20",
        "-fsanitize=alignment,bounds",
        "-fno-sanitize-recover=all",
        "-Wno-unknown-pragmas",  # the kernels' #pragma unroll
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCHNOVA_CUDA_EMULATION=1",
    ]
    log("building the CUDA emulation layer torchnova._C_cuda_emu (TORCHNOVA_CUDA_EMULATION=1; test-only)")
    return cpp_extension.CppExtension(
        name="torchnova._C_cuda_emu",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "emulation", "shim"), os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": flags},
    )


ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    name="torchnova",
    version="0.1.0",
    description="Triton, CUDA and C++ kernels for factorized space-time attention, CogVideo dual-channel "
    "attention and the MESA/SAF KL regularizer",
    package_dir={"": "pyext"},
    packages=find_packages("pyext"),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "bench": ["numpy", "matplotlib", "tqdm", "nvidia-ml-py"],
        "test": ["pytest", "numpy", "hypothesis==6.170.15"],
        "examples": ["scikit-learn", "matplotlib"],
        # Grid carbon intensity by country / cloud region from CodeCarbon's bundled data (torchnova.energy);
        # without it the CO2 figures use the fixed 475 gCO2/kWh world average and say so.
        "carbon": ["codecarbon>=3.3,<4"],
        # torchnova.integrations: the model libraries it patches (pinned: the versions the tests compare against)
        "integrations": ["diffusers==0.42.1", "timm==1.0.31", "video-diffusion-pytorch==0.7.0", "einops==0.8.2",
                         "einops-exts==0.0.4", "rotary-embedding-torch==0.9.1", "torchvision==0.29.1"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
