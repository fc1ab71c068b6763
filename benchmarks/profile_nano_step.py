#!/usr/bin/env python
"""Where one training step of the nano setting spends its time, per method.

Builds the methods as benchmarks/nano_table.py does (random weights, 224x224,
SGD with momentum, a new 100-class head), runs two warm-up steps, then one step
under torch.profiler, and prints, for each method: the step time, the time of the
convolution passes (forward, input gradient and, for ft, weight gradient: oneDNN /
cuDNN convolutions and the batched GEMMs the lean backbone uses for 1x1 convs),
everything else, and the operators that took longest.

    python benchmarks/profile_nano_step.py --model resnet50 --methods ft,da2

Profiler times are CPU self times of one step each; on a noisy machine run it twice.
Python 3.6 compatible.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import nano_table  # noqa: E402

# The operators that do a convolution pass's arithmetic (their self time is the pass).
CONV_OPS = ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution_backward",
            "aten::mkldnn_convolution_backward", "aten::cudnn_convolution", "aten::cudnn_convolution_transpose",
            "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::slow_conv_transpose2d",
            "aten::bmm", "aten::baddbmm")


def profile_method(model, method, batch_size, device, top):
    from torch.profiler import ProfilerActivity, profile

    setup = nano_table.MethodSetup(model, method, batch_size, 224, 100, device)
    setup.timed_step()
    setup.timed_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_time = setup.timed_step()
    self_ms = {}
    for event in prof.key_averages():
        self_ms[event.key] = self_ms.get(event.key, 0.0) + event.self_cpu_time_total / 1e3
    conv_ms = sum(self_ms.get(key, 0.0) for key in CONV_OPS)
    total_ms = sum(self_ms.values())
    print("{} {} batch {}: step {:.3f} s (profiled); operators {:.0f} ms: convolution passes {:.0f} ms, "
          "other {:.0f} ms".format(model, method, batch_size, step_time, total_ms, conv_ms, total_ms - conv_ms))
    for key, ms in sorted(self_ms.items(), key=lambda kv: -kv[1])[:top]:
        print("  {:8.1f} ms  {}{}".format(ms, key, "  (conv)" if key in CONV_OPS else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=nano_table.MODELS)
    parser.add_argument("--methods", default="ft,da2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=12, help="operators listed per method")
    args = parser.parse_args(argv)
    for method in args.methods.split(","):
        profile_method(args.model, method, args.batch_size, torch.device(args.device), args.top)


if __name__ == "__main__":
    main()
