#!/usr/bin/env python
"""Nano-setting step times with every method in a process of its own.

nano_table.py times its methods round-robin in one process, which keeps a VM's
slow minutes fair to all of them, but lets them share the C allocator: on the
development VM ft's step took 8-20 % longer beside da2 than alone, because what
one method frees changes how often the next one's fresh tensors fault their
pages in. This script starts one process per (checkout, method) instead and
goes round them `--repeats` times, so drift still hits every row alike; each
process times `--steps` steps after one warm-up step and reports its median.
A row's figure is the median over its processes; ratios are to ft's row of the
same checkout.

    python benchmarks/step_time_processes.py --model resnet50 --methods ft,da2
    python benchmarks/step_time_processes.py --checkouts .,/tmp/old   # A/B against another checkout

`--checkouts` takes directories of da2ext checkouts with their extension built
in place (setup.py build_ext --inplace); each process imports da2ext and the
benchmark code from its checkout. Python 3.6 compatible.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs inside each process: prints the median step time in seconds, alone on the last line.
_CHILD = """
import os, sys
checkout = os.path.abspath(sys.argv[1])
sys.path[:0] = [os.path.join(checkout, "benchmarks"), checkout]
import torch
import nano_table
setup = nano_table.MethodSetup(sys.argv[2], sys.argv[3], int(sys.argv[4]), 224, 100, torch.device(sys.argv[6]))
setup.timed_step()
times = sorted(setup.timed_step() for _ in range(int(sys.argv[5])))
print(repr(times[len(times) // 2]))
"""


def time_in_process(checkout, model, method, batch_size, steps, device):
    output = subprocess.check_output([sys.executable, "-c", _CHILD, checkout, model, method, str(batch_size),
                                      str(steps), device], stderr=subprocess.DEVNULL, universal_newlines=True)
    return float(output.strip().splitlines()[-1])


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--methods", default="ft,da2", help="comma-separated; ft is added if missing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process (median)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per row, taken round-robin")
    parser.add_argument("--checkouts", default=os.path.dirname(HERE), help="comma-separated checkout directories")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if "ft" not in methods:
        methods.insert(0, "ft")
    checkouts = [os.path.abspath(c) for c in args.checkouts.split(",")]
    times = dict(((c, m), []) for c in checkouts for m in methods)
    for repeat in range(args.repeats):
        for checkout in checkouts:
            for method in methods:
                seconds = time_in_process(checkout, args.model, method, args.batch_size, args.steps, args.device)
                times[(checkout, method)].append(seconds)
                print("round {} {} {}: {:.3f} s".format(repeat + 1, checkout, method, seconds), flush=True)
    print("\n{} batch {}, {} processes per row, median of {} steps each:".format(
        args.model, args.batch_size, args.repeats, args.steps))
    print("| checkout | method | step s (median) | per process | time vs ft |")
    print("| --- | --- | --- | --- | --- |")
    for checkout in checkouts:
        ft = median(times[(checkout, "ft")])
        for method in methods:
            row = times[(checkout, method)]
            print("| {} | {} | {:.3f} | {} | {:.2f} |".format(checkout, method, median(row),
                                                              " ".join("{:.3f}".format(t) for t in row),
                                                              median(row) / ft))


if __name__ == "__main__":
    main()
