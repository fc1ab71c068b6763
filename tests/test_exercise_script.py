"""tools/exercise_cuda_kernels.py, the script compute-sanitizer runs on a GPU, checked here
on the CPU kernels so that it stays runnable where no GPU is (its checks are the same)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "exercise_cuda_kernels.py")


def test_exercise_script_runs_on_cpu_and_finds_no_mismatch():
    result = subprocess.run([sys.executable, SCRIPT, "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.rstrip().endswith("0 mismatches")
    # every op of the extension was exercised: both adaptor modes, both activations, the adapted model
    for tag in ("adaptor add", "adaptor mul", "packed_activation upper=inf", "packed_activation upper=6.0",
                "adapt(resnet18) grad fc.weight"):
        assert tag in result.stdout, tag
