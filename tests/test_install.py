"""Installing and rebuilding (issue "installing and rebuilding without surprises"):
an isolated build or a missing torch stops with the command that works, not a
traceback; an extension built against another torch is named at import; `python -m
da2ext info` says what is installed; a wheel built once installs into a fresh
virtualenv with the same torch and passes the CPU tests there.

The wheel round trip compiles the extension again (CPU only, a few minutes on two
cores): it runs where DA2EXT_TEST_WHEEL=1 (CI sets it) and is skipped otherwise.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import da2ext
from da2ext.ops import REBUILD_COMMAND, build_mismatch, recorded_build_info
from helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command, cwd, env=None, timeout=600):
    return subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=timeout)


def _minimal_copy(tmp_path):
    """What setup.py reads before it needs torch: itself, the README and the version."""
    copy = tmp_path / "da2ext-src"
    (copy / "da2ext").mkdir(parents=True)
    for name in ("setup.py", "README.md", os.path.join("da2ext", "__init__.py")):
        shutil.copy(os.path.join(ROOT, name), str(copy / name))
    return str(copy)


def test_setup_without_torch_stops_with_the_command_that_works(tmp_path):
    copy = _minimal_copy(tmp_path)
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    result = _run([sys.executable, "setup.py", "build_ext"], cwd=copy, env=env)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    assert "da2ext: cannot import torch here (No module named 'torch')" in result.stdout
    assert "pip install --no-build-isolation ." in result.stdout and "TORCH_CUDA_ARCH_LIST=5.3" in result.stdout


def test_an_isolated_pip_build_says_to_use_no_build_isolation(tmp_path):
    copy = _minimal_copy(tmp_path)
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "wheels"), copy],
                  cwd=str(tmp_path), timeout=900)
    if "cannot import torch here" not in result.stdout and (
            "Could not find a version that satisfies the requirement" in result.stdout
            or "No matching distribution" in result.stdout):
        pytest.skip("pip could not set up an isolated build environment here (no package index reachable)")
    assert result.returncode != 0
    assert "da2ext: cannot import torch here" in result.stdout, result.stdout[-4000:]
    assert "pip install --no-build-isolation ." in result.stdout


def test_setup_refuses_a_toolkit_of_another_cuda_major_version():
    sys.path.insert(0, ROOT)
    try:
        source = open(os.path.join(ROOT, "setup.py")).read()
        namespace = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "setup_under_test"}
        # Only the helpers: everything before the extension list is built.
        exec(compile(source.split("\nwith io.open(")[0], "setup.py", "exec"), namespace)
    finally:
        sys.path.remove(ROOT)
    mismatch = namespace["cuda_mismatch"]
    assert mismatch("13.0", "13.0") is None and mismatch("12.4", "12.1") is None
    assert mismatch(None, "13.0") is None and mismatch("13.0", None) is None
    message = mismatch("12.6", "13.0")
    assert "CUDA toolkit is version 12.6 but torch was built with CUDA 13.0" in message and "CUDA_HOME" in message


def test_the_build_is_recorded_in_the_extension():
    info = recorded_build_info()
    if info is None:
        pytest.skip("the extension was not built (a bare source checkout)")
    assert info["torch"] == torch.__version__
    assert info["openmp"] in (True, False)
    if da2ext.backend("cpu") == "cpu":  # the extension itself loaded: its own record
        from da2ext import _C
        built = _C.build_info()
        assert built["torch"] == torch.__version__ and built["cplusplus"] >= 201402
        assert (built["cuda"] is not None) == bool(_C.built_with_cuda())


def test_build_mismatch_names_both_versions_and_the_rebuild_command():
    assert build_mismatch(None) is None
    assert build_mismatch({"torch": ""}) is None
    assert build_mismatch({"torch": torch.__version__}) is None
    message = build_mismatch({"torch": "1.10.0"}, running="2.14.1")
    assert "built against torch 1.10.0 but this is torch 2.14.1" in message and REBUILD_COMMAND in message


def test_importing_under_another_torch_warns_and_info_says_so():
    if recorded_build_info() is None:
        pytest.skip("the extension was not built (a bare source checkout)")
    script = textwrap.dedent("""
        import sys, warnings
        import torch
        torch.__version__ = "9.9.9"   # as if torch had been upgraded after the build
        warnings.simplefilter("always")
        from da2ext.cli import main
        sys.exit(main(["info"]))
    """)
    result = _run([sys.executable, "-c", script], cwd=ROOT)
    assert result.returncode == 1, result.stdout
    assert "built against torch {} but this is torch 9.9.9".format(torch.__version__) in result.stdout
    assert REBUILD_COMMAND in result.stdout and "MISMATCH" in result.stdout


def test_an_extension_that_cannot_load_under_another_torch_is_named_from_its_build_record():
    """The usual failure after a torch upgrade: the extension's import dies on an undefined
    symbol. The record written beside it still names both versions; the reference runs."""
    if recorded_build_info() is None:
        pytest.skip("the extension was not built (a bare source checkout)")
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class UndefinedSymbol(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "da2ext._C":
                    raise ImportError("da2ext/_C.so: undefined symbol: _ZN3c1015SmallVectorBase")
                return None

        sys.meta_path.insert(0, UndefinedSymbol())
        import torch
        torch.__version__ = "9.9.9"
        warnings.simplefilter("always")
        import da2ext
        print("backend", da2ext.backend("cpu"))
    """)
    result = _run([sys.executable, "-c", script], cwd=ROOT)
    assert result.returncode == 0, result.stdout
    assert "built against torch {} but this is torch 9.9.9".format(torch.__version__) in result.stdout
    assert "cannot be loaded (da2ext/_C.so: undefined symbol" in result.stdout and REBUILD_COMMAND in result.stdout
    assert "backend reference" in result.stdout


def test_info_reports_versions_backends_and_optional_libraries(capsys):
    status, out, err = run_cli(["info"], capsys)
    assert status == 0, err
    assert out.startswith("da2ext {} (".format(da2ext.__version__))
    assert "torch {}".format(torch.__version__) in out
    assert "  cpu: {}".format(da2ext.backend("cpu")) in out
    if recorded_build_info() is not None:
        assert "extension built against torch {}".format(torch.__version__) in out and "OpenMP: " in out
    for distribution in ("timm", "safetensors", "peft", "onnxruntime", "tqdm"):
        assert "\n  {} ".format(distribution) in out


@pytest.mark.skipif(os.environ.get("DA2EXT_TEST_WHEEL", "0").strip().lower() not in ("1", "true", "yes", "on"),
                    reason="builds the extension again (minutes): set DA2EXT_TEST_WHEEL=1 (CI does)")
def test_a_wheel_installs_into_a_fresh_virtualenv_and_passes_the_cpu_tests(tmp_path):
    # A copy of the tracked files, so that the build leaves the checkout's build/ alone.
    source = tmp_path / "src"
    files = subprocess.check_output(["git", "ls-files"], cwd=ROOT, universal_newlines=True).split()
    for name in files:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), str(target))
    env = dict(os.environ, FORCE_ONLY_CPU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                  str(tmp_path / "wheels"), str(source)], cwd=str(tmp_path), env=env, timeout=1800)
    assert built.returncode == 0, built.stdout[-6000:]
    wheel, = glob.glob(str(tmp_path / "wheels" / "da2ext-*.whl"))

    # A fresh virtualenv that sees this interpreter's libraries (the same torch) through a
    # path file, but not its da2ext: a plain path added by a .pth does not run that
    # directory's own .pth files (the editable install's hook among them).
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], cwd=str(tmp_path)).returncode == 0
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=str(tmp_path)).stdout.strip()
    with open(os.path.join(site, "outer_libraries.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=str(tmp_path))
    assert installed.returncode == 0, installed.stdout[-4000:]
    where = _run([python, "-c", "import da2ext; print(da2ext.__file__); print(da2ext.backend('cpu'))"],
                 cwd=str(tmp_path))
    assert where.returncode == 0, where.stdout
    location, backend = where.stdout.split()[-2:]
    assert location.startswith(site) and backend == "cpu", where.stdout
    info = _run([python, "-m", "da2ext", "info"], cwd=str(tmp_path))
    assert info.returncode == 0 and "extension built against torch {}".format(torch.__version__) in info.stdout
    tests = [os.path.join(ROOT, "tests", name) for name in ("test_gradcheck.py", "test_packed_activation.py")]
    result = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + tests, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-6000:]
