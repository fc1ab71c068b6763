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
against the torch that is installed (an isolated build would fetch another one, or
find none: this file then stops with a message saying so, not a traceback).

The build records what it was built with (torch, CUDA, architectures, OpenMP) in
the extension (da2ext._C.build_info()) and beside it (da2ext/_build_info.py, read
when the extension cannot be loaded), so that an import under another torch says
which two versions meet instead of failing on an undefined symbol.
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
GENERATED = os.path.join(HERE, "build", "generated")  # the build-info header (not in the source tree)

INSTALL_HELP = """\
da2ext builds a C++ extension against the torch that is installed, so pip must not
build it in an isolated environment. Install torch first, then:

    pip install --no-build-isolation .          (add -e for a development install)

On a Jetson Nano (JetPack 4.6, NVIDIA's torch 1.10 wheel installed):

    TORCH_CUDA_ARCH_LIST=5.3 MAX_JOBS=1 pip install --no-build-isolation .
"""


def stop(message):
    """End the build with `message` on stderr and exit status 1, without a traceback."""
    sys.stderr.write("\nda2ext: " + message.rstrip() + "\n\n")
    sys.exit(1)


def import_torch():
    try:
        import torch
    except ImportError as error:
        stop("cannot import torch here ({}).\n\n{}".format(error, INSTALL_HELP))
    return torch


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


def toolkit_cuda_version(cuda_home):
    """The CUDA toolkit's version ("13.0") from `nvcc --version`, or None."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_mismatch(toolkit, torch_cuda):
    """Why a toolkit of version `toolkit` cannot build for torch's CUDA `torch_cuda`
    (their major versions differ: the kernels would not link against torch's CUDA
    libraries), or None."""
    if toolkit is None or torch_cuda is None:
        return None
    if toolkit.split(".")[0] != torch_cuda.split(".")[0]:
        return ("the CUDA toolkit is version {} but torch was built with CUDA {}: install the toolkit of torch's "
                "major version (or the torch build for CUDA {}) and point CUDA_HOME at it".format(
                    toolkit, torch_cuda, toolkit.split(".")[0]))
    return None


def cuda_build_wanted(torch, cpp_extension):
    """Whether to compile the CUDA kernels, and why not when they are skipped."""
    if env_flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU is set"
    if torch.version.cuda is None:
        reason = "the installed torch {} was built without CUDA".format(torch.__version__)
    elif cpp_extension.CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    else:
        reason = cuda_mismatch(toolkit_cuda_version(cpp_extension.CUDA_HOME), torch.version.cuda)
        if reason is None:
            return True, ""
    if env_flag("FORCE_CUDA"):
        stop("FORCE_CUDA=1 but the CUDA kernels cannot be built: " + reason)
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


def visible_archs(torch):
    """The architectures of the visible GPUs, which cpp_extension compiles for when
    TORCH_CUDA_ARCH_LIST is not set ("8.6;9.0")."""
    return ";".join(sorted(set("{}.{}".format(*torch.cuda.get_device_capability(i))
                               for i in range(torch.cuda.device_count()))))


def build_info(torch, with_cuda, openmp):
    """What the extension is built with, as da2ext._C.build_info() reports it."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": (os.environ.get("TORCH_CUDA_ARCH_LIST") or visible_archs(torch)) if with_cuda else None,
        "openmp": openmp,
    }


def c_string(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_build_info_header(info):
    """build/generated/da2ext_build_info.h: the build's facts as C string literals
    (a header rather than -D flags: no shell quoting, and ninja rebuilds what includes it)."""
    if not os.path.isdir(GENERATED):
        os.makedirs(GENERATED)
    lines = ["// Written by setup.py for this build; not in the source tree.", "#pragma once"]
    for key in ("torch", "cuda", "cuda_archs"):
        lines.append("#define DA2EXT_BUILT_{} {}".format(key.upper(), c_string(info[key] or "")))
    text = "\n".join(lines) + "\n"
    path = os.path.join(GENERATED, "da2ext_build_info.h")
    if not os.path.isfile(path) or io.open(path, encoding="utf-8").read() != text:  # keep ninja's timestamps
        with io.open(path, "w", encoding="utf-8") as f:
            f.write(text)


def write_build_info_module(directory, info):
    """_build_info.py beside the extension: what it was built with, readable when
    the extension itself cannot be loaded (another torch: an undefined symbol)."""
    text = ('"""What da2ext._C was built with (written by setup.py; not in the source tree)."""\n'
            "BUILD_INFO = {!r}\n".format(info))
    with io.open(os.path.join(directory, "_build_info.py"), "w", encoding="utf-8") as f:
        f.write(text)


def extensions():
    locate_cuda_home()  # before cpp_extension reads CUDA_HOME at import
    torch = import_torch()
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
    include_dirs = [os.path.join(HERE, "csrc"), GENERATED]
    with_cuda, reason = cuda_build_wanted(torch, cpp_extension)
    if not with_cuda:
        print("da2ext: building the CPU kernels only ({})".format(reason))
        BUILD_INFO.update(build_info(torch, False, "-fopenmp" in cxx_flags))
        return [
            cpp_extension.CppExtension(
                "da2ext._C", ext_sources, include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch)
    print("da2ext: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={}".format(
        os.environ.get("TORCH_CUDA_ARCH_LIST", "(the visible GPUs)")))
    BUILD_INFO.update(build_info(torch, True, "-fopenmp" in cxx_flags))
    ext_sources += sources("csrc/ops/cuda/*.cpp") + sources("csrc/ops/cuda/*.cu")
    return [
        cpp_extension.CUDAExtension(
            "da2ext._C", ext_sources, include_dirs=include_dirs,
            define_macros=[("DA2EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link_flags,
        )
    ]


BUILD_INFO = {}  # filled by extensions(), written by the build_ext command


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(no_python_abi_suffix=False)

    class BuildExtensionWithInfo(base):
        """Writes the build-info header before compiling and _build_info.py beside the extension."""

        def run(self):
            write_build_info_header(BUILD_INFO)
            base.run(self)
            write_build_info_module(os.path.dirname(self.get_ext_fullpath("da2ext._C")), BUILD_INFO)

    return BuildExtensionWithInfo


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
