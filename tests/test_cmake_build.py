"""The stand-alone CMake build (CMakeLists.txt): configure, build and ctest it, then
load the library it builds into a fresh interpreter.

CPU only (-DDA2EXT_WITH_CUDA=OFF) to stay quick, yet it compiles the kernels
again (about a minute on two cores): set DA2EXT_SKIP_CMAKE_TEST=1 to skip it.
"""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE = shutil.which("cmake")

pytestmark = [
    pytest.mark.skipif(os.environ.get("DA2EXT_SKIP_CMAKE_TEST", "0").strip().lower() in ("1", "true", "yes", "on"),
                       reason="DA2EXT_SKIP_CMAKE_TEST is set"),
    pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH (needed to test the stand-alone CMake build)"),
]


def run(command, cwd, timeout):
    """Run a command; fail the test with its output when it fails."""
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=timeout)
    assert result.returncode == 0, "{} failed (exit status {}):\n{}".format(
        " ".join(command), result.returncode, result.stdout[-8000:])
    return result.stdout


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """A Release, CPU-only build of CMakeLists.txt in a temporary directory."""
    build = str(tmp_path_factory.mktemp("cmake-build"))
    run([CMAKE, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DDA2EXT_WITH_CUDA=OFF",
         "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path], cwd=build, timeout=600)
    run([CMAKE, "--build", build, "--config", "Release", "--parallel", "2"], cwd=build, timeout=1800)
    return build


def test_ctest_passes(cmake_build):
    ctest = os.path.join(os.path.dirname(CMAKE), "ctest")
    if not os.path.isfile(ctest):
        ctest = shutil.which("ctest") or "ctest"
    output = run([ctest, "--output-on-failure", "-C", "Release", "-V"], cwd=cmake_build, timeout=600)
    assert "all checks passed" in output, output[-8000:]
    assert "FAIL " not in output, output[-8000:]


def test_library_loads_and_runs_in_fresh_interpreter(cmake_build):
    # A new interpreter that never imports da2ext: its _C registers the same ops, and
    # registering them twice in one process fails.
    libraries = [p for p in glob.glob(os.path.join(cmake_build, "**", "*da2ext_ops*"), recursive=True)
                 if p.endswith((".so", ".dylib", ".dll"))]
    assert len(libraries) == 1, "expected one built da2ext_ops library, found {}".format(libraries)
    script = textwrap.dedent("""
        import sys
        import torch

        torch.ops.load_library(sys.argv[1])
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        channel_mean, spatial, argmax = torch.ops.da2ext.descriptor_pool(x)
        torch.testing.assert_close(channel_mean, x.mean((2, 3)), rtol=0, atol=1e-12)
        torch.testing.assert_close(spatial[:, 0], x.mean(1), rtol=0, atol=1e-12)
        torch.testing.assert_close(spatial[:, 1], x.amax(1), rtol=0, atol=0)
        assert argmax.dtype == torch.int32 and torch.equal(argmax.long(), x.argmax(1))
        assert "da2ext" not in sys.modules, "the fresh interpreter imported da2ext"
        print("descriptor_pool OK")
    """)
    # cwd: the build directory, so that nothing named da2ext is importable from it
    output = run([sys.executable, "-c", script, libraries[0]], cwd=cmake_build, timeout=600)
    assert "descriptor_pool OK" in output, output
