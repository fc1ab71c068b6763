"""A work directory of learned domains, shared by `python -m da2ext train`,
`eval` and `digits-demo`:

    RUNS/domains/<method>/<domain>.safetensors   one file per learned domain (.npz without safetensors)
    RUNS/metrics/<domain>-<method>.json          what training it measured
    RUNS/checkpoints/<domain>-<method>.pt        while it trains; removed when the domain file is written

Domain files live per method because a domain file fits only a model built with
its method (load_domain refuses the others). Learning a new domain loads every
domain already there into the same model first, so one model ends up holding
all of them, each bit-identical to what was saved.

The commands' steps, each calling down and never called back: domain_name
(the data directory checked before anything slow), build_model (a backbone
from da2ext.models in a MultiDomainModel), check_learning_rates,
load_saved_domains, learn_domain (the loaders of da2ext.data, then
loop.train_domain, which writes the domain file), evaluate_domain.
"""
import contextlib
import glob
import json
import os
import sys

import torch

from ..data.loaders import DataError, check_domain_dir, domain_loaders, report_skipped, val_loader
from ..domains.atomic_file import remove_stale_partials
from ..domains.domain_file import DomainFileError
from ..domains.multidomain import MultiDomainModel
from ..domains.preprocessing import make_preprocessing
from ..domains.run_lock import RunLockedError, run_lock
from ..models import backbones
from .loop import NonFiniteTrainingError, evaluate, recorded_learning_rates, train_domain
from .lr_schedule import WARMUP_FRACTION

# The errors a step raises are named here too, so that a caller (the command line) needs this module only.
__all__ = ["DataError", "DomainExistsError", "DomainFileError", "NonFiniteTrainingError", "RunLockedError", "WorkDir",
           "build_model", "check_learning_rates", "domain_file_hint", "domain_name", "evaluate_domain", "learn_domain",
           "load_saved_domains"]

_DOMAIN_EXTENSIONS = (".safetensors", ".npz")


def _has_safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


class WorkDir(object):
    """The paths of a work directory (nothing is created until written)."""

    def __init__(self, root):
        self.root = os.path.abspath(os.fspath(root))

    def lock_path(self, method, name):
        return os.path.join(self.root, "locks", "{}-{}.lock".format(name, method))

    def domain_dir(self, method):
        return os.path.join(self.root, "domains", method)

    def domain_path(self, method, name):
        extension = ".safetensors" if _has_safetensors() else ".npz"
        return os.path.join(self.domain_dir(method), name + extension)

    def domain_files(self, method):
        """[(name, path)] of the domain files of `method`, in the order they were written."""
        paths = [p for ext in _DOMAIN_EXTENSIONS for p in glob.glob(os.path.join(self.domain_dir(method), "*" + ext))]
        paths.sort(key=lambda p: (os.path.getmtime(p), p))
        return [(os.path.splitext(os.path.basename(p))[0], p) for p in paths]

    def metrics_path(self, method, name):
        return os.path.join(self.root, "metrics", "{}-{}.json".format(name, method))

    def checkpoint_path(self, method, name):
        return os.path.join(self.root, "checkpoints", "{}-{}.pt".format(name, method))

    def read_metrics(self, method, name):
        """The metrics JSON of a learned domain; None when there is none, or when it
        cannot be read (a warning names the file: the metrics only describe a run,
        the domain file is what holds it)."""
        path = self.metrics_path(method, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                metrics = json.load(f)
        except (OSError, ValueError) as error:  # ValueError: not JSON (truncated, overwritten, not UTF-8)
            print("warning: metrics file {} cannot be read ({}); ignoring it".format(path, error), file=sys.stderr)
            return None
        if not isinstance(metrics, dict):
            print("warning: metrics file {} holds a JSON {}, not an object; ignoring it".format(
                path, type(metrics).__name__), file=sys.stderr)
            return None
        return metrics

    def recorded_setting(self, method, name, key, default):
        """One setting a learned domain's run recorded (its image size, say), or
        `default` when there are no readable metrics or they lack it."""
        value = recorded_settings(self.read_metrics(method, name)).get(key)
        return default if value is None else value


def recorded_settings(metrics):
    """The "settings" of a run's metrics, {} when they are missing or not an object."""
    settings = (metrics or {}).get("settings")
    return settings if isinstance(settings, dict) else {}


def domain_name(data_dir, name=None):
    """The name of the domain a run learns from data_dir: `name`, or the
    directory's own name. ValueError for a name no file can take; DataError
    (data.loaders) unless data_dir has train/ and val/, a cheap check to run
    before the slow model build."""
    name = name or os.path.basename(os.path.normpath(os.fspath(data_dir)))
    if not name or name.startswith(".") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError("domain name: {!r} is not usable as a file name".format(name))
    check_domain_dir(data_dir)
    return name


def check_learning_rates(model, lr_scale=1.0, learning_rates=None):
    """ValueError, naming the group, unless the model's method trains every group
    that learning_rates ({group: rate}) names; checked before the data loads."""
    model.method.param_groups(model.model, lr_scale, learning_rates)


def build_model(backbone="efficientnet_lite0", method="da2", pretrained=True, weights=None, seed=0, device="cpu"):
    """A MultiDomainModel on a new backbone, without domains.

    pretrained: ImageNet weights, which only efficientnet_lite0 ships offline;
    the torchvision backbones need weights=PATH (or pretrained=False for random
    weights, seeded with `seed` so that every run builds the same backbone and
    the domain files of one run load into the next)."""
    if pretrained and weights is None and backbone != "efficientnet_lite0":
        raise ValueError("no pretrained weights ship offline for {}: pass a state_dict file with --weights FILE, "
                         "or --no-pretrained for random weights".format(backbone))
    torch.manual_seed(seed)
    network = backbones.create(backbone, pretrained=pretrained and weights is None, weights=weights)
    return MultiDomainModel(network, method).to(device)


def domain_file_hint(error):
    """The hint a DomainFileError gets: only a mismatch says anything about the backbone."""
    if "fingerprint" in str(error) or "architecture" in str(error):
        return "(it was learned with another backbone or weights: use the same --backbone, --weights and " \
               "--no-pretrained as then, or another --workdir)"
    return "(the file is damaged: learn that domain again with --overwrite, or remove it)"


def load_saved_domains(model, workdir, skip=(), failed=None):
    """Load every domain file of the model's method from the work directory (but
    those named in `skip`); returns their names.

    failed: None raises DomainFileError at the first file that cannot be loaded;
    a dict instead collects {name: message} for those files and goes on with the
    others (a damaged file then costs its own domain, not the work directory)."""
    loaded = []
    for name, path in workdir.domain_files(model.method.name):
        if name in skip or name in model.domains:
            continue
        try:
            model.load_domain(path, name=name)
        except DomainFileError as error:
            message = "{}\n{}".format(error, domain_file_hint(error))
            if failed is None:
                raise DomainFileError(message)
            failed[name] = message
            continue
        loaded.append(name)
    return loaded


# What a run records only when it is not the default (loop.train_domain), so that older runs compare equal.
_SETTING_DEFAULTS = {"calibrate_shifts": False}


def _recorded(recorded, key):
    return recorded.get(key, _SETTING_DEFAULTS.get(key))


def _changed_settings(metrics, expected):
    """The keys of `expected` whose values differ from those recorded in a run's metrics."""
    recorded = recorded_settings(metrics)
    return [k for k, v in sorted(expected.items()) if _recorded(recorded, k) != v]


class DomainExistsError(ValueError):
    """learn_domain(overwrite=False) found the domain learned already in the work directory."""


def _learned_already(workdir, model, name, metrics, expected):
    """The message refusing to learn `name` again: what it was learned with and what would change."""
    recorded = recorded_settings(metrics)
    changes = ["{} {!r} -> {!r}".format(k, _recorded(recorded, k), expected[k]) if k != "backbone_fingerprint"
               else "the backbone's weights" for k in _changed_settings(metrics, expected)]
    accuracy = metrics.get("final_val_accuracy")
    return ("domain {} was learned already with method {} in {}{}; learning it again replaces it ({}). Pass "
            "--overwrite (overwrite=True) to do so, or use another --domain or --workdir".format(
                name, model.method.name, workdir.root,
                " (val accuracy {:.2f} %)".format(100.0 * accuracy) if isinstance(accuracy, float) else "",
                "what would change: " + "; ".join(changes) if changes else "with the same settings"))


def learn_domain(model, workdir, name, data_dir, epochs=4, batch_size=64, image_size=64, lr_scale=1.0,
                 subsample=None, seed=0, backbone="efficientnet_lite0", progress=True, num_workers=0, reuse=False,
                 learning_rates=None, warmup_fraction=WARMUP_FRACTION, overwrite=True, skip_bad_images=False,
                 calibrate_shifts=True, distributed=None, cuda_graph=False):
    """Add domain `name` to the model, learned from data_dir/{train,val}, and save
    it in the work directory (domain file, metrics; a checkpoint while it runs,
    resumed if the run was interrupted). reuse=True loads the domain file
    instead when one was learned with the same settings. learning_rates:
    {group: rate} in place of the method's rates (loop.train_domain);
    warmup_fraction: the share of steps the rates ramp up over (da2ext.training.lr_schedule).
    overwrite=False raises DomainExistsError, saying what would change, when the
    domain was learned already in the work directory (and is not reused).
    Another process learning the same domain and method in the same work
    directory makes it raise RunLockedError at once (domains/run_lock.py).
    skip_bad_images: leave out the images that cannot be read (reported on
    stderr) instead of stopping at the first (data.loaders.image_folder).
    calibrate_shifts: start the BN shifts where AdaBN's running means on the
    domain put them (loop.train_domain; on by default, as in `train`).
    distributed: a DistributedRun (training/distributed.py) when this process is
    one of a group learning the domain together; process 0 alone holds the run
    lock and writes.
    cuda_graph: replay the training steps from a CUDA graph where it can
    (loop.train_domain; eager, saying why, where it cannot).
    Returns the metrics."""
    method = model.method.name
    settings = {"backbone": backbone, "image_size": int(image_size), "subsample": subsample,
                "data": os.path.abspath(os.fspath(data_dir))}
    expected = dict(settings, method=method, epochs=int(epochs), batch_size=int(batch_size),
                    lr_scale=float(lr_scale), seed=int(seed), backbone_fingerprint=model.backbone_fingerprint,
                    learning_rates=recorded_learning_rates(learning_rates),
                    warmup_fraction=float(warmup_fraction))
    expected["calibrate_shifts"] = bool(calibrate_shifts)
    domain_path = workdir.domain_path(method, name)
    metrics_path = workdir.metrics_path(method, name)
    checkpoint_path = workdir.checkpoint_path(method, name)
    main = distributed is None or distributed.is_main
    # One run per domain and work directory: a second one stops here, saying who holds it. In a group,
    # process 0 holds it for all; the others fail at their first collective if it cannot.
    lock = run_lock(workdir.lock_path(method, name), "domain {} (method {}) in {}".format(name, method, workdir.root)) \
        if main else _held_elsewhere()
    with lock:
        stale = [f for path in (domain_path, metrics_path, checkpoint_path) for f in remove_stale_partials(path)] \
            if main else []
        if stale and progress:
            print("removed {} unfinished temporary file(s) of an earlier, killed run of {}".format(len(stale), name),
                  file=sys.stderr)
        if os.path.isfile(domain_path):
            earlier = workdir.read_metrics(method, name)
            if reuse and earlier is not None and not _changed_settings(earlier, expected):
                model.load_domain(domain_path, name=name)
                earlier["reused"] = True
                return earlier
            if not overwrite:
                raise DomainExistsError(_learned_already(workdir, model, name, earlier or {}, expected))
        train_loader, val_loader, class_names = domain_loaders(
            data_dir, backbone=backbone, image_size=image_size, batch_size=batch_size, subsample=subsample, seed=seed,
            num_workers=num_workers, skip_bad_images=skip_bad_images)
        report_skipped(train_loader.dataset)
        report_skipped(val_loader.dataset)
        model.add_domain(name, len(class_names), class_names,
                         make_preprocessing(image_size, backbones.imagenet_normalization(backbone)))
        metrics = train_domain(model, name, train_loader, val_loader, epochs, lr_scale=lr_scale,
                               checkpoint_path=checkpoint_path, metrics_path=metrics_path, progress=progress,
                               seed=seed, domain_path=domain_path, settings=settings,
                               learning_rates=learning_rates, warmup_fraction=warmup_fraction,
                               calibrate_shifts=calibrate_shifts, distributed=distributed, cuda_graph=cuda_graph)
    metrics["reused"] = False
    return metrics


@contextlib.contextmanager
def _held_elsewhere():
    """The run lock of a process that is not process 0 of its group: held by process 0."""
    yield


def evaluate_domain(model, name, data_dir, backbone="efficientnet_lite0", image_size=64, batch_size=64,
                    skip_bad_images=False):
    """(accuracy, mean cross-entropy, number of images) of the learned domain `name`
    on data_dir/val; DataError if that directory's classes are not the ones the
    domain was learned with. skip_bad_images: as in learn_domain."""
    loader, class_names = val_loader(data_dir, backbone=backbone, image_size=image_size, batch_size=batch_size,
                                     skip_bad_images=skip_bad_images)
    report_skipped(loader.dataset)
    expected = model.domain_info(name)["class_names"]
    if expected is not None and list(expected) != list(class_names):
        raise DataError("{} has classes {}, the domain was learned with {}".format(data_dir, class_names, expected))
    accuracy, loss = evaluate(model, name, loader)
    return accuracy, loss, len(loader.dataset)
