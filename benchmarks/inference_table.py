"""Inference latency of an adapted domain against the plain pretrained backbone, on the CPU.

    python benchmarks/inference_table.py --tag cpu-2cores
    python benchmarks/inference_table.py --image-sizes 64 --batch-sizes 1 --runs 20

Rows, per image size and batch: the adapted model in PyTorch (MultiDomainModel,
lean modules, eval mode, no autograd), its exported ONNX file in ONNX Runtime
(da2ext.deploy.export_domain: BNs folded, shifts baked in, adaptors as standard
ops), and the plain pretrained backbone (timm's tf_efficientnet_lite0 with its
ImageNet weights and 1000-class head) in PyTorch and exported the same way.
The adaptors' inference overhead is the adapted ONNX model's latency over the
plain backbone's ONNX latency. The runs are split into --rounds rounds, each
with fresh ONNX Runtime sessions (one session's latency differs from the next
one's by several per cent on the same file); in a round each model is run
round-robin in blocks of 10 runs (each block after one untimed run, so that one
model's threads have gone quiet before the next is timed; ONNX Runtime's threads
do not spin-wait), so that a slow moment of the machine hits them all. A row's
latency is the median over rounds of each round's median, its ratio the median
of the rounds' paired ratios, shown with their range. The domain's tensors are random (adaptors with non-zero
gamma, rank 4, shifts moved): latency does not depend on their values.

Writes benchmarks/results/inference_<tag>.json and .md, with the commit, the
command and the machine.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import da2ext  # noqa: E402
from da2ext import methods  # noqa: E402
from da2ext.deploy import export_domain  # noqa: E402
from da2ext.deploy.export import INPUT_NAME, OUTPUT_NAME  # noqa: E402
from da2ext.domains.preprocessing import make_preprocessing  # noqa: E402
from da2ext.models import backbones  # noqa: E402
from da2ext.profiling import device_description  # noqa: E402
from provenance import git_commit, rerun_command, write_table  # noqa: E402
from step_time_processes import median  # noqa: E402

BLOCK = 10  # runs of one model in a row (round-robin by blocks)
ROWS = ("adapted, PyTorch", "adapted, ONNX Runtime", "backbone, PyTorch", "backbone, ONNX Runtime")


def adapted_domain(image_size, seed=0):
    """A MultiDomainModel on the ImageNet Lite0 with one 10-class domain whose
    tensors are random (what latency sees of a learned one)."""
    model = da2ext.MultiDomainModel(backbones.efficientnet_lite0(pretrained=True))
    model.add_domain("bench", 10, [str(i) for i in range(10)],
                     make_preprocessing(image_size, backbones.imagenet_normalization("efficientnet_lite0")))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.domain_tensors("bench").values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    model.set_domain("bench")
    return model.eval()


def onnx_session(path, threads, profile=False):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.enable_profiling = profile
    # Threads that spin-wait after a run would take the cores from the next model's run.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def export_backbone(path, image_size):
    """The plain pretrained Lite0 (its own head) as ONNX, exported as export_domain exports a domain."""
    network = backbones.efficientnet_lite0(pretrained=True).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    program = torch.onnx.export(network, (example,), None, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], external_data=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    program.save(path)
    return network


def onnx_runners(directory, threads):
    """{ONNX row: a function of a batch}, each on a fresh ONNX Runtime session."""
    def onnx_runner(name):
        session = onnx_session(os.path.join(directory, name + ".onnx"), threads)
        return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]

    return {ROWS[1]: onnx_runner("adapted"), ROWS[3]: onnx_runner("backbone")}


def runners(image_size, directory, threads):
    """{row: a function of a batch (N x 3 x S x S float32 tensor)} and the adapted model;
    the ONNX files are written into `directory` (onnx_runners opens them again)."""
    adapted = adapted_domain(image_size)
    export_domain(adapted, "bench", os.path.join(directory, "adapted.onnx"), "onnx")
    backbone = export_backbone(os.path.join(directory, "backbone.onnx"), image_size)

    def torch_runner(model):
        def run(batch):
            with torch.no_grad():
                return model(batch)
        return run

    run_by_row = {ROWS[0]: torch_runner(adapted), ROWS[2]: torch_runner(backbone)}
    run_by_row.update(onnx_runners(directory, threads))
    return run_by_row, adapted


def kernel_time_by_op(path, batch, threads, runs=20):
    """ONNX Runtime's own profile of `runs` runs of the model at `path`: microseconds
    per run spent in each operator type's kernels (its layout reorders included)."""
    session = onnx_session(path, threads, profile=True)
    for _ in range(runs):
        session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    trace = session.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    totals = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / float(runs)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _round(run_by_row, batch, runs, warmup):
    """{row: [seconds]} of one round: warm-up, then the rows in turn, a block of runs at a time."""
    times = dict((row, []) for row in ROWS)
    for row in ROWS:
        for _ in range(warmup):
            run_by_row[row](batch)
    for _ in range(0, runs, BLOCK):
        for row in ROWS:  # each model in turn, a block of runs at a time, its first untimed
            run_by_row[row](batch)
            for _ in range(BLOCK):
                start = time.perf_counter()
                run_by_row[row](batch)
                times[row].append(time.perf_counter() - start)
    return times


def measure(image_size, batch_sizes, runs, warmup, threads, profile=False, rounds=1):
    records, profiles = [], {}
    per_round = max(BLOCK, runs // rounds // BLOCK * BLOCK)
    with tempfile.TemporaryDirectory() as directory:
        run_by_row, adapted = runners(image_size, directory, threads)
        for batch_size in batch_sizes:
            batch = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                expected = adapted(batch)
            onnx_error = float((torch.from_numpy(run_by_row[ROWS[1]](batch)) - expected).abs().max())
            times = dict((row, []) for row in ROWS)
            round_latencies = dict((row, []) for row in ROWS)
            for number in range(rounds):
                if number:
                    run_by_row.update(onnx_runners(directory, threads))  # fresh sessions
                for row, values in _round(run_by_row, batch, per_round, warmup).items():
                    times[row] += values
                    round_latencies[row].append(median(values))
            latency = dict((row, median(values)) for row, values in round_latencies.items())
            ratios = dict((row, [a / b for a, b in zip(round_latencies[row], round_latencies[ROWS[3]])])
                          for row in ROWS)
            for row in ROWS:
                records.append({"image_size": image_size, "batch_size": batch_size, "model": row,
                                "latency": latency[row], "latencies": times[row],
                                "round_latencies": round_latencies[row],
                                "vs_backbone_onnx": median(ratios[row]),
                                "vs_backbone_onnx_range": [min(ratios[row]), max(ratios[row])],
                                "adapted_onnx_max_logit_error": onnx_error})
            overhead = ratios[ROWS[1]]
            print("{}x{} batch {:3d}: ".format(image_size, image_size, batch_size) + "  ".join(
                "{} {:.2f} ms".format(row, 1e3 * latency[row]) for row in ROWS) +
                "  (adaptors' overhead in ONNX Runtime: {:.2f}x, {:.2f}-{:.2f} over {} rounds)".format(
                    median(overhead), min(overhead), max(overhead), rounds), flush=True)
        if profile:
            batch = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
            profiles[image_size] = dict((name, kernel_time_by_op(os.path.join(directory, name + ".onnx"), batch,
                                                                 threads)) for name in ("adapted", "backbone"))
    return records, profiles


def profile_markdown(profiles):
    """Per image size, batch 1: each operator type's kernel time in both ONNX models."""
    lines = []
    for image_size, by_model in sorted(profiles.items()):
        ops = sorted(set(by_model["adapted"]) | set(by_model["backbone"]),
                     key=lambda op: -(by_model["adapted"].get(op, 0) + by_model["backbone"].get(op, 0)))
        lines += ["", "ONNX Runtime's profile at {0}x{0}, batch 1 (kernel time per run, microseconds; the "
                      "profiler's own cost included):".format(image_size), "",
                  "| operator | adapted | backbone |", "| --- | --- | --- |"]
        for op in ops:
            lines.append("| {} | {:.0f} | {:.0f} |".format(op, by_model["adapted"].get(op, 0.0),
                                                            by_model["backbone"].get(op, 0.0)))
        lines.append("| total | {:.0f} | {:.0f} |".format(sum(by_model["adapted"].values()),
                                                          sum(by_model["backbone"].values())))
    return lines


def markdown(records, meta, profiles=None):
    lines = ["# Inference latency: an adapted domain against the plain pretrained backbone", "",
             "{} · torch {} · onnxruntime {} · da2ext {} at {} · EfficientNet-Lite0 (ImageNet weights), da2 "
             "({}) · median of {} runs after {} warm-up, round-robin in blocks of {}, in {} rounds of fresh ONNX "
             "Runtime sessions (the median of the rounds' medians; the ratio: the median of the rounds' paired "
             "ratios)".format(
                 meta["device"], meta["torch"], meta["onnxruntime"], meta["da2ext"], meta["commit"],
                 methods.get("da2").description, meta["runs"], meta["warmup"], BLOCK, meta["rounds"]),
             "", "Rerun: `{}`".format(meta["command"]), "",
             "vs backbone ONNX: latency over the plain backbone's in ONNX Runtime at the same size and batch "
             "(the adapted ONNX row is the adaptors' inference overhead).", "",
             "| input | batch | model | latency ms | vs backbone ONNX | range over rounds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        low, high = r["vs_backbone_onnx_range"]
        lines.append("| {0}x{0} | {1} | {2} | {3:.2f} | {4:.2f}x | {5:.2f}-{6:.2f}x |".format(
            r["image_size"], r["batch_size"], r["model"], 1e3 * r["latency"], r["vs_backbone_onnx"], low, high))
    errors = sorted(set((r["image_size"], r["batch_size"], r["adapted_onnx_max_logit_error"]) for r in records))
    lines += ["", "Largest logit difference, adapted ONNX Runtime against PyTorch: " + "; ".join(
        "{0}x{0} batch {1}: {2:.1e}".format(*e) for e in errors) + "."]
    lines += profile_markdown(profiles or {})
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-sizes", default="64,224", help="input sizes (default: 64, the digits domains', "
                                                                "and 224)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (median; a multiple of 10)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds the runs are split into, each on fresh ONNX Runtime sessions (default: 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime's intra-op threads (default 0: its own choice, one per core)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile both ONNX models at batch 1 (ONNX Runtime's kernel time per operator type)")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs < BLOCK * args.rounds:
        parser.error("--rounds must be positive and --runs at least {} per round".format(BLOCK))
    try:
        import onnxruntime
    except ImportError:
        parser.error("needs onnxruntime (pip install onnxruntime onnx onnxscript)")
    records, profiles = [], {}
    for image_size in [int(s) for s in args.image_sizes.split(",")]:
        rows, profile = measure(image_size, [int(b) for b in args.batch_sizes.split(",")], args.runs, args.warmup,
                                args.threads, args.profile, args.rounds)
        records += rows
        profiles.update(profile)
    meta = {"device": device_description("cpu"),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "da2ext": da2ext.__version__,
            "commit": git_commit(), "runs": args.runs, "rounds": args.rounds, "warmup": args.warmup,
            "command": rerun_command("benchmarks/inference_table.py", sys.argv[1:] if argv is None else argv)}
    write_table(args.out_dir, "inference_" + args.tag, {"meta": meta, "records": records, "onnx_profiles": profiles},
                markdown(records, meta, profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
