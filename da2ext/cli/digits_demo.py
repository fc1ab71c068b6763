"""The main job (`python -m da2ext digits-demo`): the offline digits domains
learned one after another on one frozen, ImageNet-pretrained EfficientNet-Lite0,
then every domain evaluated, in a table.

    domain | val accuracy | kept for backward | file size

It also shows the point of multi-domain learning with frozen weights: learning
a domain cannot change an earlier one. Right after a domain is learned, its
logits on a fixed batch of its val images are kept; after the last domain they
are computed again, in the same model and in a fresh model that loads the
domain files, and must be bit-identical ("earlier domains unchanged: yes").

An interrupted demo continues where it stopped: the data are reused, a domain
learned with the same settings is loaded from its file, and the domain that was
training resumes from its checkpoint.
"""
import json
import os
import sys
import time

import torch

from ..data.digits import DOMAINS, prepare_digits
from ..data.loaders import val_loader
from ..domains.atomic_file import atomic_write
from ..profiling import device_of
from ..training.loop import MIB, evaluate
from ..training.lr_schedule import WARMUP_FRACTION
from ..training.workflow import WorkDir, build_model, learn_domain, load_saved_domains

__all__ = ["run_digits_demo", "results_table"]

FIXED_BATCH = 32  # val images whose logits must stay bit-identical


def _fixed_batch(loader):
    images = []
    for batch, _ in loader:
        images.append(batch)
        if sum(len(b) for b in images) >= FIXED_BATCH:
            break
    return torch.cat(images)[:FIXED_BATCH]


def _logits(model, name, images):
    was_training = model.training
    with model.domain(name), torch.no_grad():
        model.eval()
        try:
            return model(images.to(device_of(model))).cpu()
        finally:
            model.train(was_training)


def results_table(rows):
    """The Markdown table of the demo's rows."""
    lines = ["| domain | val accuracy | kept for backward (MiB) | file size (KiB) | epochs | train time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append("| {} | {:.1f} % | {:.1f} | {:.1f} | {} | {:.0f} |".format(
            r["domain"], 100.0 * r["val_accuracy"], r["saved_bytes"] / MIB, r["file_bytes"] / 1024.0, r["epochs"],
            r["train_time"]))
    return "\n".join(lines)


def _say(message, out):
    out.write(message + "\n")
    out.flush()


def run_digits_demo(workdir="runs/digits", epochs=4, subsample=None, domains=DOMAINS, method="da2", image_size=64,
                    batch_size=64, lr_scale=1.0, warmup_fraction=WARMUP_FRACTION, seed=0, train_per_domain=1440, val_per_domain=360,
                    backbone="efficientnet_lite0", pretrained=True, weights=None, device="cpu", progress=True,
                    out=sys.stdout, calibrate_shifts=True, cuda_graph=False):
    """Prepare the digits domains in WORKDIR/data, learn them in order, evaluate
    them all; write WORKDIR/results.json and results.md and return the results."""
    started = time.time()
    work = WorkDir(workdir)
    data_root = os.path.join(work.root, "data")
    _say("preparing the digits domains in {}".format(data_root), out)
    prepare_digits(data_root, seed=seed, image_size=image_size, train_per_domain=train_per_domain,
                   val_per_domain=val_per_domain, domains=domains, progress=progress)

    model = build_model(backbone, method, pretrained=pretrained, weights=weights, seed=seed, device=device)
    # Domains learned earlier by another command stay; the demo's own are (re)learned or reused below.
    load_saved_domains(model, work, skip=domains)
    reference_logits, fixed_images, metrics = {}, {}, {}
    for name in domains:
        data_dir = os.path.join(data_root, name)
        metrics[name] = learn_domain(model, work, name, data_dir, epochs=epochs, batch_size=batch_size,
                                     image_size=image_size, lr_scale=lr_scale, subsample=subsample, seed=seed,
                                     backbone=backbone, progress=progress, reuse=True,
                                     warmup_fraction=warmup_fraction, calibrate_shifts=calibrate_shifts,
                                     cuda_graph=cuda_graph)
        loader, _ = val_loader(data_dir, backbone=backbone, image_size=image_size, batch_size=batch_size)
        fixed_images[name] = _fixed_batch(loader)
        reference_logits[name] = _logits(model, name, fixed_images[name])
        _say("{}: {} val accuracy {:.1f} %{}".format(
            name, "learned" if not metrics[name]["reused"] else "loaded (learned earlier with these settings),",
            100.0 * metrics[name]["final_val_accuracy"], ""), out)

    # After the last domain: every domain again, in this model and in a fresh one built from the files.
    unchanged = all(torch.equal(_logits(model, n, fixed_images[n]), reference_logits[n]) for n in domains)
    fresh = build_model(backbone, method, pretrained=pretrained, weights=weights, seed=seed, device=device)
    load_saved_domains(fresh, work)
    files_reproduce = all(torch.equal(_logits(fresh, n, fixed_images[n]), reference_logits[n]) for n in domains)
    rows = []
    for name in domains:
        loader, _ = val_loader(os.path.join(data_root, name), backbone=backbone, image_size=image_size,
                               batch_size=batch_size)
        accuracy, loss = evaluate(fresh, name, loader)
        m = metrics[name]
        rows.append({"domain": name, "val_accuracy": accuracy, "val_loss": loss, "val_images": len(loader.dataset),
                     "saved_bytes": m["saved_bytes"], "file_bytes": os.path.getsize(work.domain_path(method, name)),
                     "trainable_params": m["trainable_params"], "epochs": m["epochs"], "train_time": m["total_time"],
                     "step_time": m["step_time"], "train_images": m["settings"]["train_images"],
                     "reused": m["reused"]})
    table = results_table(rows)
    results = {"method": method, "backbone": backbone, "pretrained": bool(pretrained and weights is None),
               "weights": weights, "epochs": epochs, "image_size": image_size, "batch_size": batch_size,
               "subsample": subsample, "seed": seed, "calibrate_shifts": bool(calibrate_shifts), "domains": rows,
               "earlier_domains_unchanged": unchanged, "domain_files_reproduce_logits": files_reproduce,
               "wall_time": time.time() - started, "torch": torch.__version__, "threads": torch.get_num_threads()}
    atomic_write(os.path.join(work.root, "results.json"),
                 lambda f: f.write(json.dumps(results, indent=1, sort_keys=True) + "\n"), mode="w")
    summary = "\n".join([
        "{} on {} ({}), {} epoch(s), {}x{} images, batch {}{}:".format(
            method, backbone, "ImageNet weights" if results["pretrained"] else (weights or "random weights"),
            epochs, image_size, image_size, batch_size, ", shifts calibrated" if calibrate_shifts else ""),
        "", table, "",
        "earlier domains unchanged: {}".format("yes" if unchanged else "NO"),
        "domain files reproduce the logits: {}".format("yes" if files_reproduce else "NO"),
        "wall time: {:.0f} s".format(results["wall_time"])])
    atomic_write(os.path.join(work.root, "results.md"), lambda f: f.write(summary + "\n"), mode="w")
    _say("\n" + summary, out)
    _say("results: {}".format(os.path.join(work.root, "results.json")), out)
    return results
