"""One training loop for every method (docs/design.md §3a, §4, §5): a method only says
what trains and at which learning rate (da2ext.methods); the loop is the same.

    metrics = train_domain(model, "mnist", train_loader, val_loader, epochs=4,
                           checkpoint_path="runs/checkpoints/mnist-da2.pt",
                           metrics_path="runs/metrics/mnist-da2.json",
                           domain_path="runs/domains/da2/mnist.safetensors")

Adam over the method's parameter groups (model.param_groups()), the learning
rate warmed up over the first tenth of the steps and then decayed along a cosine
(da2ext.training.lr_schedule), cross-entropy. What the run keeps
for backward (docs/design.md §4's saved_bytes) is counted once, on its first batch.

Resuming: after every epoch a checkpoint holds everything the rest of the run
depends on - the domain's tensors, the optimizer's and scheduler's state, the
torch RNG, the training loader's shuffling generator, the history so far - and
the settings it was made with. A run that finds a checkpoint with the same
settings continues after its last epoch and ends with the same weights, bit for
bit, as a run that was never interrupted; a checkpoint of other settings is
ignored (and overwritten).
"""
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from ..domains.atomic_file import atomic_write
from ..domains.checkpoint import load_checkpoint, save_checkpoint
from ..lean.shift_calibration import calibrate_shifts
from ..profiling import SavedTensorCounter, device_of, model_state, synchronize
from .loop_graph import LoopGraph, graph_unavailable, learning_rates_as_tensors, match_optimizer_to_run
from .lr_schedule import WARMUP_FRACTION, warmup_cosine_scheduler

__all__ = ["NonFiniteTrainingError", "evaluate", "train_domain"]

MIB = float(2 ** 20)
CHECKPOINT_FORMAT = "da2ext-training-checkpoint-1"


def _log(message, progress):
    if progress:
        print(message, file=sys.stderr)
        sys.stderr.flush()


def _progress_bar(loader, description, enabled):
    """tqdm over the loader's batches, or None (tqdm is optional)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=len(loader), desc=description, unit="batch", leave=True, dynamic_ncols=True)


def evaluate(model, domain, loader, distributed=None):
    """(accuracy, mean cross-entropy) of domain `domain` on the loader's images,
    in eval mode and without autograd; the model's mode and active domain come back afterwards.
    distributed: a DistributedRun whose processes each hold a share of the images
    (DistributedRun.val_loader): their sums are added up, every process gets the total."""
    device = device_of(model)
    was_training = model.training
    correct, total, loss_sum = 0, 0, 0.0
    with model.domain(domain), torch.no_grad():
        model.eval()
        try:
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                logits = model(images)
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                total += labels.numel()
        finally:
            model.train(was_training)
    if distributed is not None:
        sums = distributed.all_reduce_sum(torch.tensor([loss_sum, correct, total], dtype=torch.float64,
                                                       device=distributed.device))
        loss_sum, correct, total = float(sums[0]), int(sums[1]), int(sums[2])
    if total == 0:
        raise ValueError("evaluate: the loader gave no images")
    return correct / float(total), loss_sum / total


def _run_settings(model, domain, train_loader, epochs, lr_scale, seed, extra):
    """What a run's result depends on; a checkpoint is resumed only if they are equal."""
    settings = {
        "domain": domain,
        "method": model.method.name,
        "epochs": int(epochs),
        "lr_scale": float(lr_scale),
        "seed": int(seed),
        "batch_size": int(train_loader.batch_size),
        "train_images": len(train_loader.dataset),
        "steps_per_epoch": len(train_loader),
        "num_classes": int(model.domain_info(domain)["num_classes"]),
        "architecture": model.architecture,
        "backbone_fingerprint": model.backbone_fingerprint,
    }
    settings.update(extra or {})
    return settings


def recorded_learning_rates(learning_rates):
    """How a run's settings record the rates given in place of the method's
    ({group: float}), or None when none were given."""
    if not learning_rates:
        return None
    return dict((str(group), float(rate)) for group, rate in learning_rates.items())


def _settings_difference(recorded, settings):
    keys = sorted(set(recorded) | set(settings))
    return ["{}: {!r} in the checkpoint, {!r} now".format(k, recorded.get(k), settings.get(k))
            for k in keys if recorded.get(k) != settings.get(k)]


def _median(values):
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


class NonFiniteTrainingError(ValueError):
    """A run's loss or trained tensors became NaN or infinite (a learning rate too high for it, or
    non-finite weights): train_domain stops at once and writes no domain file and no metrics; the
    checkpoints it wrote before hold finite tensors only."""

    def __init__(self, what):
        super(NonFiniteTrainingError, self).__init__(
            "{}: the run stopped and saved nothing for the domain; lower the learning rates (--lr-scale, --lr) "
            "or check the backbone's weights".format(what))


class _Run(object):
    """The state of one training run that a checkpoint carries."""

    def __init__(self, model, domain, train_loader, epochs, lr_scale, settings, learning_rates=None,
                 warmup_fraction=WARMUP_FRACTION, forward=None, graphed=False):
        self.model = model
        self.forward = model if forward is None else forward  # a DistributedDataParallel wrapper, in a group
        self.domain = domain
        self.train_loader = train_loader
        self.settings = settings
        self.device = device_of(model)
        self.graphed = bool(graphed)
        groups = model.param_groups(lr_scale, learning_rates)
        if self.graphed:  # rates the graph reads at every replay, and an optimizer step it can capture
            self.optimizer = torch.optim.Adam(learning_rates_as_tensors(groups, self.device), capturable=True)
        else:
            self.optimizer = torch.optim.Adam(groups)
        self.graph = LoopGraph(self.forward, self.optimizer) if self.graphed else None
        # Stepped per step (not per epoch): warmup, then one cosine over the rest of the run.
        self.scheduler = warmup_cosine_scheduler(self.optimizer, int(epochs) * len(train_loader), warmup_fraction)
        self.epochs_done = 0
        self.saved_bytes = None
        self.history = {"train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": [],
                        "epoch_seconds": [], "step_seconds": []}
        self.resumed_from_epoch = None

    def state(self):
        generator = self.train_loader.generator
        return {
            "format": CHECKPOINT_FORMAT,
            "settings": self.settings,
            "epochs_done": self.epochs_done,
            "domain_tensors": dict((slot, t.detach().cpu()) for slot, t in
                                   self.model.domain_tensors(self.domain).items()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader_generator": generator.get_state() if generator is not None else None,
            "saved_bytes": self.saved_bytes,
            "history": self.history,
        }

    def restore(self, state):
        with torch.no_grad():
            for slot, t in self.model.domain_tensors(self.domain).items():
                t.copy_(state["domain_tensors"][slot])  # in place: the optimizer holds these tensors
        self.optimizer.load_state_dict(state["optimizer"])
        match_optimizer_to_run(self.optimizer, self.graphed, self.device)  # the checkpoint's run may differ
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state["loader_generator"] is not None and self.train_loader.generator is not None:
            self.train_loader.generator.set_state(state["loader_generator"])
        self.epochs_done = int(state["epochs_done"])
        self.saved_bytes = state["saved_bytes"]
        self.history = state["history"]
        self.resumed_from_epoch = self.epochs_done


def _set_aside(path):
    """Rename an unreadable checkpoint to PATH.unreadable (replacing an older one), so that the run starts
    over without destroying what a user may want to inspect."""
    aside = path + ".unreadable"
    os.replace(path, aside)
    return aside


def _resume(run, checkpoint_path, progress):
    try:
        state = load_checkpoint(checkpoint_path)
    except Exception as error:  # any way a file can fail to unpickle: truncated, random bytes, foreign globals
        aside = _set_aside(os.fspath(checkpoint_path))
        warnings.warn("{} could not be read ({}: {}); set aside as {}, training starts over".format(
            checkpoint_path, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "", aside),
            RuntimeWarning, stacklevel=3)
        return
    if state is None:
        return
    if state.get("format") != CHECKPOINT_FORMAT:
        _log("{}: not a checkpoint of this da2ext; starting over".format(checkpoint_path), progress)
        return
    difference = _settings_difference(state.get("settings", {}), run.settings)
    if difference:
        _log("{} was made with other settings ({}); starting over".format(
            checkpoint_path, "; ".join(difference[:3])), progress)
        return
    run.restore(state)
    _log("{}: resuming after epoch {}/{}".format(checkpoint_path, run.epochs_done, run.settings["epochs"]), progress)


def _eager_step(run, images, labels):
    """One step in plain autograd: (loss, logits)."""
    # Once a graph is captured, its gradient tensors stay: an eager step (a batch of other shapes) zeroes
    # and fills them instead of making new ones.
    run.optimizer.zero_grad(set_to_none=run.graph is None or not run.graph.captured)
    if run.saved_bytes is None:
        # Counted once: what this forward keeps for backward, the model's own tensors excluded.
        with SavedTensorCounter(exclude=model_state(run.model)) as counter:
            logits = run.forward(images)
            loss = F.cross_entropy(logits, labels)
        run.saved_bytes = counter.saved_bytes
    else:
        logits = run.forward(images)
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    run.optimizer.step()
    return loss, logits


def _train_epoch(run, epoch, epochs, device, progress):
    model, scheduler = run.model, run.scheduler
    model.train()
    run.forward.train()
    if hasattr(run.train_loader.sampler, "set_epoch"):  # DistributedSampler: the epoch's order from seed and epoch
        run.train_loader.sampler.set_epoch(epoch)
    bar = _progress_bar(run.train_loader, "{} {}/{}".format(run.domain, epoch + 1, epochs), progress)
    loss_sum, correct, total = 0.0, 0, 0
    try:
        for step, (images, labels) in enumerate(run.train_loader):
            images, labels = images.to(device), labels.to(device)
            synchronize(device)
            start = time.perf_counter()
            replayed = run.graph.step(images, labels) if run.graph is not None else None
            if replayed is not None:
                loss, logits = replayed
            else:
                loss, logits = _eager_step(run, images, labels)
            scheduler.step()
            if run.graph is not None:
                run.graph.keep_rates()
            synchronize(device)
            run.history["step_seconds"].append(time.perf_counter() - start)
            if run.graph is not None and not run.graph.captured and run.graph.failed is None:
                run.graph.capture(images, labels)  # after the first step (it counted saved_bytes); timed apart
            step_loss = float(loss.detach())
            if not math.isfinite(step_loss):
                raise NonFiniteTrainingError("the training loss of domain {} became {} at epoch {}/{}, step {}/{}".format(
                    run.domain, step_loss, epoch + 1, epochs, step + 1, len(run.train_loader)))
            loss_sum += step_loss * labels.numel()
            correct += int((logits.detach().argmax(1) == labels).sum())
            total += labels.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss="{:.3f}".format(loss_sum / total), acc="{:.3f}".format(correct / float(total)),
                                kept="{:.1f}MiB".format(run.saved_bytes / MIB), refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if total == 0:
        raise ValueError("train_domain: the training loader gave no images")
    return loss_sum / total, correct / float(total)


def _calibrate(model, train_loader, device, progress, batch_size):
    """calibrate_shifts over all the training images in order, `batch_size` at a time
    (a loader of its own, so that the training loader's shuffling is an uncalibrated
    run's; every process of a group does the same pass, with the group's batch)."""
    ordered = torch.utils.data.DataLoader(train_loader.dataset, batch_size=batch_size, shuffle=False)
    model.train()
    count = calibrate_shifts(model, (inputs.to(device) for inputs, _ in ordered))
    _log("calibrated the shifts of {} BN layer(s) on {} training images".format(count, len(train_loader.dataset)),
         progress)
    return count


def _check_finite(run, epoch, epochs):
    """A run whose trainable tensors hold a NaN or an infinity stops here, before its checkpoint is written."""
    bad = [slot for slot, t in run.model.domain_tensors(run.domain).items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteTrainingError("domain {}'s trained tensors hold non-finite values after epoch {}/{} ({}{})".format(
            run.domain, epoch + 1, epochs, ", ".join(bad[:3]), ", ..." if len(bad) > 3 else ""))


def _write_json(path, record):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory)
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")


def train_domain(model, domain, train_loader, val_loader, epochs, lr_scale=1.0, checkpoint_path=None,
                 metrics_path=None, progress=True, seed=0, domain_path=None, settings=None, learning_rates=None,
                 warmup_fraction=WARMUP_FRACTION, calibrate_shifts=False, distributed=None, cuda_graph=False):
    """Train domain `domain` of the MultiDomainModel `model` and return its metrics.

    train_loader: shuffles with its own seeded generator (data/loaders.py: domain_loaders)
        so that a resumed run sees the batches an uninterrupted one would.
    epochs, lr_scale: the run's length; lr_scale multiplies the method's learning rates.
    warmup_fraction: the share of the steps over which the rates ramp up
        linearly before their cosine decay (da2ext.training.lr_schedule; 0: none).
    learning_rates: {group: rate} in place of the method's rates for those
        groups (before lr_scale); recorded in the settings when given.
    checkpoint_path: written after every epoch; resumed from when it exists with
        the same settings. Removed once the domain file is written.
    metrics_path: the metrics as JSON, written at the end.
    domain_path: where the trained domain is saved (model.save_domain), if given.
    seed: seeds torch's global RNG at the start (anything random in a forward).
    calibrate_shifts: before the first step, start the BN shifts where the running
        means AdaBN estimates on the training images put them
        (da2ext.lean.shift_calibration; one pass without autograd); recorded in
        the settings when set.
    settings: further JSON-able values the run depends on (image size, data
        directory, ...): recorded in the metrics, compared before resuming.
    distributed: a DistributedRun (training/distributed.py) when this process is
        one of a torch.distributed group: each process trains on its share of
        the loaders' images (train_loader's batch size per process), gradients
        are averaged by DistributedDataParallel, evaluation sums are added up,
        and only process 0 writes the checkpoint, metrics and domain file.
        world_size is recorded in the settings.
    cuda_graph: replay the training steps from a CUDA graph captured after the
        first step (training/loop_graph.py): Adam built capturable with tensor
        rates, a batch of other shapes (the short last one) run eagerly, a
        failed capture said and the run going on eagerly. Where a graph cannot
        be used (not CUDA, a group, an older torch) the run is eager and says
        why. Not a setting of the run: the same steps, launched another way.

    Metrics: method, domain, epochs, per-epoch train_loss, train_accuracy,
    val_loss, val_accuracy, saved_bytes (kept for backward on one batch),
    trainable_params, step_time (median seconds), total_time (seconds over all
    epochs, a resumed run's earlier epochs included), file_bytes (of the domain
    file, None without domain_path), settings, resumed_from_epoch, cuda_graph
    (None unless asked for: captured, replayed_steps, capture_seconds, and
    not_used, why no graph was replayed).
    """
    if int(epochs) < 1:
        raise ValueError("epochs must be >= 1, got {}".format(epochs))
    device = device_of(model)
    model.set_domain(domain)
    torch.manual_seed(seed)
    extra = dict(settings or {})
    extra["warmup_fraction"] = float(warmup_fraction)
    if learning_rates:  # absent otherwise, so that earlier checkpoints still resume
        extra["learning_rates"] = recorded_learning_rates(learning_rates)
    if calibrate_shifts:  # the same
        extra["calibrate_shifts"] = True
    forward, writes = None, True
    if distributed is not None:
        extra["world_size"] = distributed.world_size
        train_loader, val_loader = distributed.train_loader(train_loader, seed), distributed.val_loader(val_loader)
        forward, writes = distributed.wrap(model.model), distributed.is_main
        progress = progress and writes
    graph_reason = graph_unavailable(device, distributed) if cuda_graph else None
    if graph_reason is not None:
        warnings.warn("--cuda-graph: the steps run eagerly: {}".format(graph_reason), RuntimeWarning, stacklevel=2)
    run = _Run(model, domain, train_loader, epochs, lr_scale,
               _run_settings(model, domain, train_loader, epochs, lr_scale, seed, extra), learning_rates,
               warmup_fraction, forward, graphed=cuda_graph and graph_reason is None)
    if checkpoint_path is not None:
        _resume(run, checkpoint_path, progress)
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        if writes and not os.path.isdir(directory):
            os.makedirs(directory)
    calibrated = None
    if calibrate_shifts and run.epochs_done == 0:  # a resumed run's checkpoint holds calibrated shifts
        world_size = 1 if distributed is None else distributed.world_size
        calibrated = _calibrate(model, train_loader, device, progress, train_loader.batch_size * world_size)

    for epoch in range(run.epochs_done, int(epochs)):
        start = time.perf_counter()
        train_loss, train_accuracy = _train_epoch(run, epoch, epochs, device, progress)
        _check_finite(run, epoch, epochs)
        val_accuracy, val_loss = evaluate(model, domain, val_loader, distributed)
        run.history["epoch_seconds"].append(time.perf_counter() - start)
        for key, value in (("train_loss", train_loss), ("train_accuracy", train_accuracy),
                           ("val_loss", val_loss), ("val_accuracy", val_accuracy)):
            run.history[key].append(value)
        run.epochs_done = epoch + 1
        _log("{} epoch {}/{}: train loss {:.4f} acc {:.4f}, val loss {:.4f} acc {:.4f}, kept for backward "
             "{:.1f} MiB".format(domain, epoch + 1, epochs, train_loss, train_accuracy, val_loss, val_accuracy,
                                 run.saved_bytes / MIB), progress)
        if checkpoint_path is not None and writes:
            save_checkpoint(checkpoint_path, run.state())
        if distributed is not None:
            distributed.barrier()  # the checkpoint is complete before any process goes on

    file_bytes = None
    if domain_path is not None and writes:
        directory = os.path.dirname(os.path.abspath(domain_path))
        if not os.path.isdir(directory):
            os.makedirs(directory)
        model.save_domain(domain, domain_path)
        file_bytes = os.path.getsize(domain_path)
    history = run.history
    metrics = {
        "method": model.method.name,
        "domain": domain,
        "epochs": int(epochs),
        "train_loss": history["train_loss"],
        "train_accuracy": history["train_accuracy"],
        "val_loss": history["val_loss"],
        "val_accuracy": history["val_accuracy"],
        "final_val_accuracy": history["val_accuracy"][-1],
        "saved_bytes": run.saved_bytes,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "learning_rates": dict((g["name"], float(g["initial_lr"])) for g in run.optimizer.param_groups),
        "step_time": _median(history["step_seconds"]),
        "steps": len(history["step_seconds"]),
        "total_time": math.fsum(history["epoch_seconds"]),
        "epoch_seconds": history["epoch_seconds"],
        "file_bytes": file_bytes,
        "settings": run.settings,
        "resumed_from_epoch": run.resumed_from_epoch,
        "device": str(device),
        "calibrated_layers": calibrated,
        "world_size": 1 if distributed is None else distributed.world_size,
        "cuda_graph": None if not cuda_graph else (run.graph.summary() if run.graph is not None else
                                                   LoopGraph.unused(graph_reason)),
    }
    if metrics_path is not None and writes:
        _write_json(metrics_path, metrics)
    if domain_path is not None and checkpoint_path is not None and writes and os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)  # the domain file holds the result now
    if distributed is not None:
        distributed.barrier()  # the files are in place when any process returns
    return metrics
