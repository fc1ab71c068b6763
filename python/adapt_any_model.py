"""adapt() on a model whose blocks it does not know: where the memory goes.

adapt() rewrites the blocks it knows lean (one bit per activation for backward)
wherever they sit in a model, runs everything else frozen in plain autograd, and
puts an adaptor after each stage. This script adapts a torchvision model by name
(RegNetX-400MF by default: lean throughout; try mobilenet_v3_large or
efficientnet_b0, whose hardswish / SiLU blocks run plainly), prints what adapt()
said, and what one training step keeps for backward, part by part
(da2ext.kept_bytes_by_part), against the `bias` baseline (the same model plainly
frozen with its BN shifts trainable).

    python python/adapt_any_model.py --model regnet_x_400mf
    python python/adapt_any_model.py --model mobilenet_v3_large
"""
import argparse
import copy
import warnings

import torch
import torchvision

import da2ext
from da2ext import methods


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="regnet_x_400mf", help="a torchvision model name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--image-size", type=int, default=224, help="image height and width (default: 224)")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)()   # load your pretrained weights here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it says it is adapting generically, as adapt() below will
        # the `bias` baseline: the same model frozen in plain PyTorch with its BN shifts trainable
        baseline = methods.get("bias").build(copy.deepcopy(model), 10)
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
    print("adapted: {:.1f} MiB; bias (plainly frozen, BN shifts trainable): {:.1f} MiB ({:.1f}x less)".format(
        total / 2 ** 20, plain.saved_bytes / 2 ** 20, plain.saved_bytes / max(total, 1)))


if __name__ == "__main__":
    main()
