"""adapt() on a model whose blocks it does not know: where the memory goes.

adapt() rewrites the blocks it knows lean (one bit per activation for backward)
wherever they sit in a model, keeps only the input of every other block (SiLU,
hardswish, GELU, squeeze-excitation, LayerNorm: recomputed in backward), and puts
an adaptor after each stage. This script adapts a torchvision model by name
(RegNetX-400MF by default: lean throughout; try mobilenet_v3_large,
efficientnet_b0 or convnext_tiny, whose blocks are recomputed), prints what
adapt() said, what one training step keeps for backward, part by part
(da2ext.kept_bytes_by_part), against the `bias` baseline (the same model plainly
frozen with its BN shifts trainable), and what the largest recomputed block holds
while its backward runs.

    python python/adapt_any_model.py --model regnet_x_400mf
    python python/adapt_any_model.py --model efficientnet_b0
    python python/adapt_any_model.py --model convnext_tiny --recompute-dtype float16
    python python/adapt_any_model.py --model mobilenet_v3_large --adaptor-max-stride 8
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
    parser.add_argument("--recompute-dtype", choices=["float16", "bfloat16"], default=None,
                        help="keep recomputed blocks' inputs in half the bytes (default: as they are, exact)")
    parser.add_argument("--adaptor-max-stride", type=int, default=None,
                        help="adaptors only after the stages whose output is at most this many times smaller than "
                             "the input, as da2 places them with 8 (default: after every stage)")
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
        model = da2ext.adapt(model, num_classes=10, rank=4, recompute_dtype=getattr(torch, args.recompute_dtype)
                             if args.recompute_dtype else None, adaptor_max_stride=args.adaptor_max_stride)
    for warning in caught:
        print("adapt() said: {}".format(warning.message))
    print("adaptors after: {}".format(", ".join(model.da2ext_stages)))
    da2ext.print_trainable_parameters(model)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    rows = da2ext.kept_bytes_by_part(model, images)
    print("\nkept for backward, {} images of {}x{}:".format(args.batch_size, args.image_size, args.image_size))
    print("{:45s} {:16s} {:>9s}".format("part", "runs", "MiB"))
    for row in rows:
        if row["kept_bytes"] or row["treatment"] in ("lean", "recomputed"):
            print("{:45s} {:16s} {:9.2f}".format(row["part"], row["treatment"], row["kept_bytes"] / 2 ** 20))
    total = sum(row["kept_bytes"] for row in rows)
    state = list(baseline.parameters()) + list(baseline.buffers())
    with da2ext.SavedTensorCounter(exclude=state) as plain:
        baseline(images)
    print("adapted: {:.1f} MiB; bias (plainly frozen, BN shifts trainable): {:.1f} MiB ({:.1f}x less)".format(
        total / 2 ** 20, plain.saved_bytes / 2 ** 20, plain.saved_bytes / max(total, 1)))
    largest = da2ext.largest_recompute_transient(model, images)
    if largest is not None:
        print("while its backward runs, the largest recomputed block ({}, {}) holds {:.1f} MiB more".format(
            largest["part"], largest["type"], largest["transient_bytes"] / 2 ** 20))


if __name__ == "__main__":
    main()
