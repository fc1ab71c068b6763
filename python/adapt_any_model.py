"""adapt() on a model whose blocks it does not know: where the memory goes.

adapt() rewrites the blocks it knows lean (one bit per activation for backward)
wherever they sit in a model, runs everything else frozen in plain autograd, and
puts an adaptor after each stage. This script adapts a torchvision model by name
(RegNetX-400MF by default: lean throughout; try mobilenet_v3_large or
efficientnet_b0, whose hardswish / SiLU blocks run plainly), prints what adapt()
said, and what one training step keeps for backward, part by part
(da2ext.kept_bytes_by_part), against the same model plainly frozen with its BN
shifts trainable.

    python python/adapt_any_model.py --model regnet_x_400mf
    python python/adapt_any_model.py --model mobilenet_v3_large
"""
import argparse
import copy
import warnings

import torch
import torchvision
from torch import nn

import da2ext


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="regnet_x_400mf", help="a torchvision model name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="image height and width (default: 224)")
    return parser.parse_args()


def plainly_frozen_with_shifts(model):
    """The `bias` baseline: frozen as it is, eval-mode BN, BN shifts trainable."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.requires_grad_(True)
    return model


def main():
    args = parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)()   # load your pretrained weights here
    baseline = plainly_frozen_with_shifts(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = da2ext.adapt(model, num_classes=10, rank=4)
    for warning in caught:
        print("adapt() said: {}".format(warning.message))
    print("adaptors after: {}".format(", ".join(model.da2ext_stages)))
    da2ext.print_trainable_parameters(model)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = da2ext.kept_bytes_by_part(model, images)
    print("\nkept for backward, {} images of {}x{}:".format(args.batch_size, args.image_size, args.image_size))
    print("{:45s} {:16s} {:>9s}".format("part", "runs", "MiB"))
    for row in rows:
        if row["kept_bytes"] or row["treatment"] == "lean":
            print("{:45s} {:16s} {:9.2f}".format(row["part"], row["treatment"], row["kept_bytes"] / 2 ** 20))
    total = sum(row["kept_bytes"] for row in rows)
    state = list(baseline.parameters()) + list(baseline.buffers())
    with da2ext.SavedTensorCounter(exclude=state) as plain:
        baseline(images)
    print("adapted: {:.1f} MiB; plainly frozen with BN shifts: {:.1f} MiB ({:.1f}x less)".format(
        total / 2 ** 20, plain.saved_bytes / 2 ** 20, plain.saved_bytes / max(total, 1)))


if __name__ == "__main__":
    main()
