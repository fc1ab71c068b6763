"""Build of da2ext: the Python package plus the da2ext._C extension.

The C++ CPU kernels always build. The CUDA kernels build when PyTorch was built
with CUDA and a CUDA toolkit (nvcc) is found; no GPU is needed to compile them.

Switches (environment variables):
  FORCE_CUDA=1            build the CUDA kernels or fail saying why not
  FORCE_ONLY_CPU=1        never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    architectures to compile for, e.g. "5.3" (Jetson Nano) or
                          "9.0"; when unset and no GPU is visible, the architectures
                          the installed torch was built for
  MAX_JOBS                parallel compile jobs (a Jetson Nano wants MAX_JOBS=1)

Install with `pip install --no-build-isolation .` so that the extension is built
against the torch that is installed (an isolated build would fetch another one).
"""
import glob
import io
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with io.open(os.path.join(HERE, "da2ext", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def locate_cuda_home():
    """Set CUDA_HOME from nvcc itself when it is not set.

    cpp_extension guesses the toolkit as the parent of the nvcc found on PATH,
    which is wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc
    exec'ing /usr/local/cuda-13.0/bin/nvcc); nvcc's dry run names its real root.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return
    match = re.search(r"^#\$ TOP=(.+)$", out, re.M)
    if match:
        top = os.path.normpath(match.group(1).strip())
        if os.path.isfile(os.path.join(top, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = top


def cuda_build_wanted(torch, cpp_extension):
    """Whether to compile the CUDA kernels, and why not when they are skipped."""
    if env_flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU is set"
    if torch.version.cuda is None:
        reason = "the installed torch {} was built without CUDA".format(torch.__version__)
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    else:
        return True, ""
    if env_flag("FORCE_CUDA"):
        raise RuntimeError("FORCE_CUDA=1 but the CUDA kernels cannot be built: " + reason)
    return False, reason


def default_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST for a machine without a visible GPU: torch's own list."""
    archs = []
    arch_list = torch.cuda.get_arch_list()
    if not arch_list and hasattr(torch._C, "_cuda_getArchFlags"):
        # older torch lists its architectures only when a GPU is visible
        arch_list = (torch._C._cuda_getArchFlags() or "").split()
    for arch in arch_list:
        match = re.match(r"sm_(\d+)(\d)$", arch)
        if match:
            archs.append("{}.{}".format(match.group(1), match.group(2)))
    if not archs:
        raise RuntimeError(
            "No GPU is visible and TORCH_CUDA_ARCH_LIST is not set: set it to the architectures "
            "to compile for, e.g. TORCH_CUDA_ARCH_LIST=5.3 for a Jetson Nano or 8.6 for an RTX 30xx."
        )
    return ";".join(archs)


def extensions():
    locate_cuda_home()  # before cpp_extension reads CUDA_HOME at import
    import torch
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is an inline header whose '#pragma omp parallel' only
    # takes effect when the extension itself is compiled with OpenMP; without it every
    # CPU kernel runs on one thread. libgomp resolves to the copy torch already loaded.
    # -fopenmp-simd (implied, kept for compilers without OpenMP): lets the row sums
    # vectorise (see cpu/residual_attention_loops.cpp).
    cxx_flags = ["-O3", "-fopenmp-simd", "-DDA2EXT_OPENMP_SIMD"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    ext_sources = sources("csrc/extension.cpp") + sources("csrc/ops/*.cpp") + sources("csrc/ops/cpu/*.cpp")
    with_cuda, reason = cuda_build_wanted(torch, cpp_extension)
    if not with_cuda:
        print("da2ext: building the CPU kernels only ({})".format(reason))
        return [
            cpp_extension.CppExtension(
                "da2ext._C", ext_sources, include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch)
    print("da2ext: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={}".format(
        os.environ.get("TORCH_CUDA_ARCH_LIST", "(the visible GPUs)")))
    ext_sources += sources("csrc/ops/cuda/*.cpp") + sources("csrc/ops/cuda/*.cu")
    return [
        cpp_extension.CUDAExtension(
            "da2ext._C", ext_sources, include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("DA2EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link_flags,
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=False)


with io.open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="da2ext",
    version=read_version(),
    description="Deep Attention Adaptor (DA2): memory-lean multi-domain learning with fused C++/CUDA kernels",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["da2ext", "da2ext.*"]),
    python_requires=">=3.6",
    install_requires=["torch>=1.10", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "files": ["safetensors"],
        "progress": ["tqdm"],
        "plots": ["matplotlib"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
