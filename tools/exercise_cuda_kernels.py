#!/usr/bin/env python
"""Run every CUDA kernel of da2ext once, forward and backward, on small odd shapes.

Meant to run under NVIDIA's compute-sanitizer, which checks each kernel launch
for out-of-bounds accesses (memcheck), shared-memory races (racecheck) and
reads of uninitialised memory (initcheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/exercise_cuda_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/exercise_cuda_kernels.py --kernels-only

The shapes are chosen to leave partial warps, partial blocks and partial 32-bit
mask words (H*W and N*C*H*W not multiples of 32), where indexing bugs hide.
It also compares each result with the pure-PyTorch reference, so a run without
the sanitizer is a quick smoke test. Exits non-zero on a mismatch.
--kernels-only skips the adapted ResNet-18 step (cuDNN's kernels slow the sanitizer);
--device cpu runs the same checks on the CPU kernels (a test of this script).
Python 3.6 compatible.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import da2ext  # noqa: E402
from da2ext import reference  # noqa: E402
from da2ext.profiling import synchronize  # noqa: E402

# (N, C, H, W): partial warps and mask words; one spatial size of 1; a batch of 1.
SHAPES = [(2, 19, 7, 5), (1, 33, 1, 1), (3, 16, 13, 11)]
DTYPES = [torch.float32, torch.float16]
DEVICE = "cuda"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}


def relative_error(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


def check(name, actual, expected, dtype, failures):
    error = relative_error(actual, expected)
    ok = bool(torch.isfinite(actual).all()) and error <= TOLERANCE[dtype]
    print("{:60s} rel. error {:.2e} {}".format(name, error, "ok" if ok else "MISMATCH"))
    if not ok:
        failures.append(name)


def exercise_adaptor(shape, dtype, mode, failures):
    torch.manual_seed(0)
    n, c, h, w = shape
    fused = da2ext.ResidualAttentionAdaptor(c, reduction=4, mode=mode).to(DEVICE)
    with torch.no_grad():
        fused.gamma.normal_(std=0.5)
    ref = reference.ResidualAttentionAdaptor(c, reduction=4, mode=mode).to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(shape, device=DEVICE)
    x_fused = x.to(dtype).detach().requires_grad_()
    x_ref = x.double().detach().requires_grad_()
    ref = ref.double()
    # The op takes its parameters in the input's dtype.
    fused_half = fused.to(dtype)
    y = fused_half(x_fused)
    y_ref = ref(x_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    tag = "adaptor {} {} {}".format(mode, tuple(shape), str(dtype).replace("torch.", ""))
    synchronize(torch.device(DEVICE))
    check(tag + " forward", y, y_ref, dtype, failures)
    check(tag + " grad input", x_fused.grad, x_ref.grad, dtype, failures)
    for (name, p), (_, p_ref) in zip(fused_half.named_parameters(), ref.named_parameters()):
        check(tag + " grad " + name, p.grad, p_ref.grad, dtype, failures)


def exercise_packed_activation(shape, dtype, upper, memory_format, failures):
    torch.manual_seed(1)
    x = (torch.randn(shape, device=DEVICE) * 4).to(dtype).contiguous(memory_format=memory_format)
    x = x.detach().requires_grad_()
    y = da2ext.packed_activation(x, upper)
    x_ref = x.detach().double().requires_grad_()
    # torch's ReLU and ReLU6 (hardtanh) pass no gradient at 0 and at 6, and neither does
    # the packed op; clamp's backward passes it at its bounds on some torch versions, and
    # float16 inputs land exactly on 6.
    y_ref = F.hardtanh(x_ref, 0.0, upper) if upper != float("inf") else F.relu(x_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    synchronize(torch.device(DEVICE))
    tag = "packed_activation upper={} {} {} {}".format(upper, tuple(shape), str(dtype).replace("torch.", ""),
                                                       str(memory_format).replace("torch.", ""))
    if not y.is_contiguous(memory_format=memory_format):
        failures.append(tag + ": the output lost the input's memory order")
    check(tag + " forward", y, y_ref, dtype, failures)
    check(tag + " grad input", x.grad, x_ref.grad, dtype, failures)
    in_place = x.detach().clone()
    mask = torch.ops.da2ext.packed_activation_(in_place, upper)
    _, expected_mask = torch.ops.da2ext.packed_activation(x.detach(), upper)
    check(tag + " in place", in_place, y_ref, dtype, failures)
    if not torch.equal(mask, expected_mask):
        failures.append(tag + " in place: the mask differs from the out-of-place op's")


def exercise_adapted_model(failures):
    """One training step of adapt()'s lean ResNet-18 on CUDA against the CPU float64 model."""
    import torchvision
    # cuDNN convolutions default to TF32 on Ampere and later (10-bit mantissa): through
    # 18 layers that alone puts float32 gradients a few percent from float64's.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(std=0.1)
                m.running_var.uniform_(0.5, 2.0)
    adapted = da2ext.adapt(model, num_classes=7)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("gamma"):
                p.normal_(std=0.5)
    x = torch.randn(3, 3, 45, 37)
    target = torch.randint(0, 7, (3,))
    results = {}
    for key, device, dtype in (("test", DEVICE, torch.float32), ("reference", "cpu", torch.float64)):
        copy = _deepcopy_to(adapted, device, dtype)
        copy.train()
        loss = torch.nn.functional.cross_entropy(copy(x.to(device, dtype)), target.to(device))
        loss.backward()
        results[key] = (loss.detach(), {n: p.grad for n, p in copy.named_parameters() if p.grad is not None})
    synchronize(torch.device(DEVICE))
    check("adapt(resnet18) loss", results["test"][0], results["reference"][0], torch.float32, failures)
    for name, grad in results["reference"][1].items():
        # float32 against float64 through 18 layers: the fp16 tolerance.
        check("adapt(resnet18) grad " + name, results["test"][1][name], grad, torch.float16, failures)


def _deepcopy_to(model, device, dtype):
    import copy
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def main(argv):
    global DEVICE
    if "--device" in argv:
        DEVICE = argv[argv.index("--device") + 1]  # "cpu": a smoke test of this script without a GPU
    if DEVICE == "cuda" and (not torch.cuda.is_available() or da2ext.backend("cuda") != "cuda"):
        print("needs a CUDA GPU and a CUDA build of da2ext (backend: {})".format(da2ext.backend("cuda")))
        return 2
    failures = []
    for shape in SHAPES:
        for dtype in DTYPES if DEVICE == "cuda" else [torch.float32]:
            for mode in ("add", "mul"):
                exercise_adaptor(shape, dtype, mode, failures)
            for upper in (float("inf"), 6.0):
                for memory_format in (torch.contiguous_format, torch.channels_last):
                    exercise_packed_activation(shape, dtype, upper, memory_format, failures)
    if "--kernels-only" not in argv:
        exercise_adapted_model(failures)
    print("{} mismatches".format(len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
