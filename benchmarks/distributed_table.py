"""What crosses the network in a distributed step, and a CPU step with 1 and 2 gloo processes.

    python benchmarks/distributed_table.py --tag cpu-2cores
    python benchmarks/distributed_table.py --models efficientnet_lite0 --steps 3

Bytes: each method's model wrapped as da2ext's DistributedRun wraps it
(DistributedDataParallel over what the method trains), in a gloo group of one
process, with a communication hook that counts the bytes of every gradient
bucket it is handed in one training step (nano setting: batch 8, 224x224, 100
classes): what each process all-reduces per step, whatever the group's size.

Step time: da2 on each model, one global batch of 16 images (224x224) per step,
as one process (2 threads) and as two gloo processes of 8 images each (1 thread
each) on the same cores; median of --steps steps after one warm-up.

Writes benchmarks/results/distributed_<tag>.json and .md, with the commit, the
command and the machine.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import da2ext  # noqa: E402
from da2ext.profiling import device_description  # noqa: E402
from da2ext.training.distributed import DistributedRun  # noqa: E402
from nano_table import MethodSetup, available_models  # noqa: E402
from provenance import git_commit, rerun_command, write_table  # noqa: E402
from step_time_processes import median  # noqa: E402

MODELS = ("resnet50", "efficientnet_lite0")
METHODS = ("ft", "da2")
MIB = float(2 ** 20)


def _join(rank, world_size, store, threads):
    """Join the group whose rendezvous is the file `store` (no port to race for)."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world_size)
    return DistributedRun(rank, world_size, "cpu")


def _store_path():
    directory = tempfile.mkdtemp(prefix="da2ext-distributed-table-")
    return os.path.join(directory, "store")


def bytes_per_step(model_name, method_name):
    """Bytes handed to the all-reduce in one step (a group of one, a counting comm hook)."""
    store = _store_path()
    run = _join(0, 1, store, torch.get_num_threads())
    try:
        setup = MethodSetup(model_name, method_name, 8, 224, 100, torch.device("cpu"))
        wrapped = run.wrap(setup.model)
        counted = {"bytes": 0, "buckets": 0}

        def count(state, bucket):
            buffer = bucket.buffer()
            state["bytes"] += buffer.numel() * buffer.element_size()
            state["buckets"] += 1
            future = torch.futures.Future()
            future.set_result(buffer)  # a group of one: the sum is the buffer itself
            return future

        wrapped.register_comm_hook(counted, count)
        setup.loss_fn(wrapped(setup.inputs), setup.targets).backward()
        trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
        return {"model": model_name, "method": method_name, "allreduce_bytes": counted["bytes"],
                "buckets": counted["buckets"], "trainable_params": trainable}
    finally:
        run.close()
        shutil.rmtree(os.path.dirname(store), ignore_errors=True)


def _timed_steps(rank, world_size, store, model_name, steps, results):
    run = _join(rank, world_size, store, 2 // world_size)
    try:
        local = 16 // world_size
        setup = MethodSetup(model_name, "da2", local, 224, 100, torch.device("cpu"))
        torch.manual_seed(rank)
        setup.inputs = torch.randn(local, 3, 224, 224)
        wrapped = run.wrap(setup.model)
        times = []
        for step in range(steps + 1):
            run.barrier()
            start = time.perf_counter()
            setup.optimizer.zero_grad()
            setup.loss_fn(wrapped(setup.inputs), setup.targets[:local]).backward()
            setup.optimizer.step()
            run.barrier()
            if step:
                times.append(time.perf_counter() - start)
        if rank == 0:
            results["times"] = times
    except BaseException:
        run.close(wait=False)
        raise
    run.close()


def step_time(model_name, world_size, steps):
    store = _store_path()
    try:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_timed_steps, args=(world_size, store, model_name, steps, results), nprocs=world_size,
                     join=True)
            times = list(results["times"])
    finally:
        shutil.rmtree(os.path.dirname(store), ignore_errors=True)
    return {"model": model_name, "method": "da2", "processes": world_size, "global_batch": 16,
            "step_time": median(times), "step_times": times}


def markdown(traffic, timing, meta):
    lines = ["# Distributed steps: what crosses the network, and step time with 1 and 2 gloo processes", "",
             "{} · torch {} · da2ext {} at {}".format(meta["device"], meta["torch"], meta["da2ext"], meta["commit"]),
             "", "Rerun: `{}`".format(meta["command"]), "",
             "Bytes all-reduced per step by each process (DistributedDataParallel over what the method trains, "
             "counted by a communication hook; nano setting, batch 8, 224x224, 100 classes):", "",
             "| model | method | trainable parameters | all-reduced per step | buckets |",
             "| --- | --- | --- | --- | --- |"]
    for r in traffic:
        lines.append("| {} | {} | {:,} | {:.2f} MiB | {} |".format(r["model"], r["method"], r["trainable_params"],
                                                                   r["allreduce_bytes"] / MIB, r["buckets"]))
    lines += ["", "da2's step time on the CPU, a global batch of 16 images (224x224): one process with 2 threads, "
                  "or two gloo processes of 8 images and 1 thread each (median of {} steps):".format(meta["steps"]),
              "", "| model | processes | step s |", "| --- | --- | --- |"]
    for r in timing:
        lines.append("| {} | {} | {:.3f} |".format(r["model"], r["processes"], r["step_time"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--no-timing", action="store_true", help="only the bytes")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if not dist.is_available():
        parser.error("this torch has no torch.distributed")
    traffic, timing = [], []
    for model_name in available_models(args.models):
        for method_name in args.methods.split(","):
            traffic.append(bytes_per_step(model_name, method_name))
            print("{:18s} {:4s} all-reduces {:8.2f} MiB per step".format(
                model_name, method_name, traffic[-1]["allreduce_bytes"] / MIB), flush=True)
        if not args.no_timing:
            for world_size in (1, 2):
                timing.append(step_time(model_name, world_size, args.steps))
                print("{:18s} da2  {} process(es): {:.3f} s per step".format(model_name, world_size,
                                                                            timing[-1]["step_time"]), flush=True)
    meta = {"device": device_description("cpu"),
            "torch": torch.__version__, "da2ext": da2ext.__version__, "commit": git_commit(), "steps": args.steps,
            "command": rerun_command("benchmarks/distributed_table.py", sys.argv[1:] if argv is None else argv)}
    write_table(args.out_dir, "distributed_" + args.tag, {"meta": meta, "traffic": traffic, "timing": timing},
                markdown(traffic, timing, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
