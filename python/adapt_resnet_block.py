"""Adapt a frozen ResNet-18 with a residual attention adaptor after layer3.

The pretrained network stays frozen; only the adaptor (y = F + gamma * A, gamma
starting at 0, so the adapted network starts out computing exactly the frozen
one) and a new classification head are trained. The data are synthetic (class-
dependent colours and stripes) so the script runs anywhere, without downloads.

    python python/adapt_resnet_block.py --steps 30

It also shows what the fused adaptor saves: the bytes autograd keeps for its
backward, next to those of the pure-PyTorch reference with the same weights.
"""
import argparse
import math
import time

import torch
import torchvision
from torch import nn

import da2ext

NUM_CLASSES = 10


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--image-size", type=int, default=64, help="image height and width (default: 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the new weights (default: 0)")
    return parser.parse_args()


def make_images(labels, image_size, generator):
    """Synthetic, learnable images: class k has its own colour and stripe
    direction/frequency; every image gets a random phase and some noise."""
    palette = torch.rand(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(1234))
    angles = torch.arange(NUM_CLASSES, dtype=torch.float32) * math.pi / NUM_CLASSES
    frequencies = 2.0 + torch.arange(NUM_CLASSES, dtype=torch.float32) % 3

    n = labels.shape[0]
    coords = torch.linspace(0, 2 * math.pi, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = angles[labels].view(n, 1, 1)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    stripes = torch.sin(frequencies[labels].view(n, 1, 1) * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
    images = palette[labels].view(n, 3, 1, 1) * (1 + 0.5 * stripes.unsqueeze(1))
    images = images + 0.2 * torch.randn(n, 3, image_size, image_size, generator=generator)
    return (images - 0.5) / 0.25  # roughly standardised, as a normalised photo would be


def make_batch(batch_size, image_size, generator):
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=generator)
    return make_images(labels, image_size, generator), labels


def main():
    args = parse_args()
    torch.manual_seed(args.seed)  # the new head and adaptor weights
    data = torch.Generator().manual_seed(args.seed)  # the synthetic data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. The pretrained backbone, frozen. BatchNorm in eval mode uses the
    #    pretrained running statistics and does not update them.
    model = torchvision.models.resnet18()  # random weights (the default, in old and new torchvision)
    # Load your own pretrained weights here, e.g.
    #   model.load_state_dict(torch.load("resnet18-weights.pth", map_location="cpu"))
    model.requires_grad_(False)

    # The frozen layers up to layer3's output (they share modules with `model`).
    up_to_layer3 = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                 model.layer1, model.layer2, model.layer3)
    with torch.no_grad():
        channels, height, width = up_to_layer3(torch.zeros(1, 3, args.image_size, args.image_size)).shape[1:]

    # 2. The adaptor after layer3, and a new head. Both are trainable (new
    #    modules have requires_grad=True). The spatial kernel is shrunk to fit
    #    small maps (a 7 x 7 kernel on a 4 x 4 map would be mostly padding).
    adaptor = da2ext.ResidualAttentionAdaptor(channels, reduction=16,
                                              spatial_kernel=da2ext.spatial_kernel_size(height, width))
    model.layer3 = nn.Sequential(model.layer3, adaptor)
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    nn.init.zeros_(model.fc.weight)  # start from uniform predictions (loss ln 10)
    nn.init.zeros_(model.fc.bias)
    model.to(device).eval()  # eval: frozen BN; the adaptor and head behave the same in both modes

    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"backend: {da2ext.backend(device)}")
    print(f"adaptor after layer3, on {channels} x {height} x {width} maps: {adaptor}")
    print(f"trainable parameters: {sum(p.numel() for p in trainable)} "
          f"of {sum(p.numel() for p in model.parameters())}")

    # 3. Train the adaptor and the head. A fixed held-out batch measures progress.
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    eval_images, eval_labels = make_batch(128, args.image_size, data)
    eval_images, eval_labels = eval_images.to(device), eval_labels.to(device)

    def held_out_loss():
        with torch.no_grad():
            return loss_fn(model(eval_images), eval_labels).item()

    initial_loss = held_out_loss()
    start = time.time()
    for step in range(1, args.steps + 1):
        images, labels = make_batch(args.batch_size, args.image_size, data)
        loss = loss_fn(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.time() - start:.1f} s; "
          f"mean |gamma| is now {adaptor.gamma.abs().mean().item():.4f}")

    # 4. What the adaptor keeps for backward, on one batch of layer3 features,
    #    against the pure-PyTorch reference holding the same weights.
    reference = da2ext.reference.ResidualAttentionAdaptor(channels, reduction=16,
                                                          spatial_kernel=adaptor.spatial_kernel)
    reference.load_state_dict(adaptor.state_dict())
    reference.to(device)
    with torch.no_grad():
        features = up_to_layer3(images.to(device))  # layer3's output: up_to_layer3 ends before the adaptor
        difference = (adaptor(features) - reference(features)).abs().max().item()
    fused_bytes = da2ext.saved_bytes(adaptor, features)
    reference_bytes = da2ext.saved_bytes(reference, features)
    print(f"layer3 features: {tuple(features.shape)}, {features.numel() * features.element_size()} bytes; "
          f"max |fused - reference| output difference {difference:.2e}")
    print(f"saved for backward: fused {fused_bytes} bytes, reference {reference_bytes} bytes "
          f"(the fused adaptor keeps {reference_bytes / max(fused_bytes, 1):.1f}x less)")

    print(f"final loss {held_out_loss():.4f} (initial {initial_loss:.4f})")


if __name__ == "__main__":
    main()
