"""How much the frozen backbone's features say about each domain: a linear probe.

    python benchmarks/linear_probe.py                       # digits domains, 64 and 128 px, ImageNet and random
    python benchmarks/linear_probe.py --data DIR --image-sizes 224 --no-random

Every frozen method of the digits table (last, bias, da2, ...) starts from the
backbone's features; full fine-tuning (ft) does not. This script measures how
separable the domains are in those features, with no training loop at all:
the pooled features (the classifier's input) of every train and val image, a
scikit-learn logistic regression (standardised features) fitted on train,
accuracy on val. Beside the ImageNet weights it probes the same architecture
with random weights, which says how much of the accuracy the pretraining buys.

Same data as benchmarks/digits_table.py (prepare_digits, seed 0, the same
train/val split; --subsample as there). Writes benchmarks/results/<tag>.json
and .md.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from da2ext import backbones  # noqa: E402
from da2ext.lean.adapt import supported_family  # noqa: E402
from da2ext.data.loaders import domain_loaders  # noqa: E402


def feature_extractor(model):
    """The model with its classifier replaced by the identity: images -> pooled features."""
    family = supported_family(model)
    if family == "resnet":
        model.fc = nn.Identity()
    elif family == "mobilenet_v2":
        model.classifier = nn.Identity()
    elif family == "timm_efficientnet":
        model.reset_classifier(0)
    else:
        raise TypeError("no classifier to remove from {}".format(type(model).__name__))
    return model.eval()


def features(model, loader):
    """(features N x D, labels N) as numpy arrays."""
    xs, ys = [], []
    with torch.no_grad():
        for images, labels in loader:
            xs.append(model(images))
            ys.append(labels)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def probe_accuracy(train, val):
    """Val accuracy (%) of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    classifier.fit(*train)
    return 100.0 * classifier.score(*val)


def domains_in(data_dir):
    return sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d, "train")))


def markdown(records, meta):
    domains = sorted(set(r["domain"] for r in records))
    lines = ["# Linear probe of the frozen backbone's features", "",
             "{} · torch {} · {} training images per domain (val: all) · logistic regression on standardised "
             "pooled features · {:.0f} s".format(meta["backbone"], meta["torch"], meta["train_images"],
                                                 meta["seconds"]),
             "", "Rerun: `{}`".format(meta["command"]), "",
             "| image size | weights | " + " | ".join(domains) + " | mean |",
             "| --- | --- | " + " | ".join("---" for _ in domains) + " | --- |"]
    keys = sorted(set((r["image_size"], r["weights"]) for r in records), key=lambda k: (k[0], k[1] != "imagenet"))
    for size, weights in keys:
        accuracy = dict((r["domain"], r["probe_accuracy"]) for r in records
                        if r["image_size"] == size and r["weights"] == weights)
        lines.append("| {} | {} | ".format(size, weights) + " | ".join(
            "{:.1f}".format(accuracy[d]) for d in domains) + " | {:.1f} |".format(sum(accuracy.values()) /
                                                                               len(accuracy)))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="directory of domains DIR/<domain>/{train,val} (default: the digits domains, "
                                       "written as digits_table.py writes them)")
    parser.add_argument("--workdir", default=os.path.join("runs", "linear_probe"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", help="the backbone's state_dict file (default: its shipped ImageNet weights)")
    parser.add_argument("--no-random", action="store_true", help="skip the random-weights comparison")
    parser.add_argument("--image-sizes", default="64,128")
    parser.add_argument("--subsample", type=int, default=None, help="training images per domain (default: all)")
    parser.add_argument("--tag", default="linear_probe")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    start = time.time()
    sizes = [int(s) for s in args.image_sizes.split(",")]
    variants = [("imagenet", True)] + ([] if args.no_random else [("random", False)])
    records = []
    for size in sizes:
        data = args.data
        if data is None:
            from da2ext.data.digits import prepare_digits
            data = os.path.join(args.workdir, "data_{}".format(size))
            prepare_digits(data, seed=0, image_size=size, progress=False)
        for weights, pretrained in variants:
            torch.manual_seed(0)  # the random weights
            model = feature_extractor(backbones.create(args.backbone, pretrained=pretrained,
                                                       weights=args.weights if pretrained else None))
            for domain in domains_in(data):
                train_loader, val_loader, _ = domain_loaders(os.path.join(data, domain), args.backbone, size,
                                                             batch_size=128, subsample=args.subsample, seed=0)
                train, val = features(model, train_loader), features(model, val_loader)
                record = {"image_size": size, "weights": weights, "domain": domain,
                          "probe_accuracy": probe_accuracy(train, val), "train_images": len(train[1]),
                          "val_images": len(val[1]), "feature_width": int(train[0].shape[1])}
                records.append(record)
                print("{:4d} px  {:8s}  {:10s} probe accuracy {:5.1f} %  ({} train, {} val images)".format(
                    size, weights, domain, record["probe_accuracy"], record["train_images"], record["val_images"]),
                    flush=True)
    arguments = sys.argv[1:] if argv is None else list(argv)
    meta = {"backbone": args.backbone, "torch": torch.__version__, "seconds": time.time() - start,
            "train_images": args.subsample or "all",
            "command": " ".join(["python benchmarks/linear_probe.py"] + arguments)}
    if not os.path.isdir(args.out_dir):
        os.makedirs(args.out_dir)
    with open(os.path.join(args.out_dir, args.tag + ".json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(os.path.join(args.out_dir, args.tag + ".md"), "w") as f:
        f.write(markdown(records, meta))
    print(markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
