"""Adaptors at points of your choice, in a model left as it is: a RegNet.

torchvision's RegNetX-400MF is frozen as a whole, a residual attention adaptor
goes after each of its four stages (da2ext.insert_adaptors, by module name), and
the adaptors and a new head train on synthetic images (class-dependent colours
and checks, so the script runs anywhere without downloads). The adaptors start
with gamma 0, so before training the model computes exactly what the frozen one
did; the script checks that, then trains and reports the loss.

    python python/insert_adaptors.py --steps 20

This path changes nothing but the chosen points: the frozen stages keep, for
backward, what plain autograd keeps (printed at the end). adapt() takes this
RegNet too and makes its blocks lean (python/adapt_any_model.py).
"""
import argparse

import torch
import torchvision
from torch import nn

import da2ext

NUM_CLASSES = 4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--image-size", type=int, default=64, help="image height and width (default: 64)")
    parser.add_argument("--rank", type=int, default=4, help="the adaptors' rank (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the new weights (default: 0)")
    return parser.parse_args()


def make_batch(batch_size, image_size, generator):
    """Class k: its own colour, and a checkerboard of its own period."""
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=generator)
    palette = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9], [0.9, 0.9, 0.2]])
    coords = torch.arange(image_size)
    period = (4 + 4 * labels).view(-1, 1, 1)
    checks = ((coords.view(1, -1, 1) // period + coords.view(1, 1, -1) // period) % 2).float()
    images = palette[labels].view(-1, 3, 1, 1) * (0.5 + 0.5 * checks.unsqueeze(1))
    return images + 0.1 * torch.randn(images.shape, generator=generator), labels


def pooled_features(model, images):
    """What the model's head reads (its fc swapped out for the call), without autograd."""
    head, model.fc = model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.fc = head


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = torchvision.models.regnet_x_400mf()   # load your pretrained weights here
    model.eval()                                   # frozen BN statistics
    for p in model.parameters():
        p.requires_grad_(False)
    probe, _ = make_batch(2, args.image_size, generator)
    before = pooled_features(model, probe)

    stages = ["trunk_output.block{}".format(i) for i in range(1, 5)]
    names = da2ext.insert_adaptors(model, stages, probe, rank=args.rank)
    print("adaptors after: {}".format(", ".join(names)))
    # gamma starts at 0: the adapted trunk computes exactly what the frozen one did.
    print("features unchanged before training: {}".format(torch.equal(pooled_features(model, probe), before)))
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)  # a new head, trainable
    da2ext.print_trainable_parameters(model)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(args.steps):
        images, labels = make_batch(args.batch_size, args.image_size, generator)
        with da2ext.SavedTensorCounter() as kept:
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0 or step == args.steps - 1:
            print("step {:3d}: loss {:.3f}".format(step + 1, loss.item()))
    print("kept for backward in a step: {:.1f} MiB (plain autograd in the frozen stages)".format(
        kept.saved_bytes / 2 ** 20))


if __name__ == "__main__":
    main()
