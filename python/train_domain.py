"""Learn one domain on a frozen torchvision ResNet-18 with DA2 and save it as a file.

What a user does with their own backbone and data: wrap the network in a
MultiDomainModel (the DA2 recipe: adaptors after every block, BN shifts and a
new head train, the rest is frozen and keeps only packed bits for backward),
add a domain, train it with the package's loop, save it, load it elsewhere.

    python python/train_domain.py                          # a small offline digits domain, random weights
    python python/train_domain.py --weights resnet18.pth   # your pretrained state_dict
    python python/train_domain.py --data my_images         # my_images/{train,val}/<class>/*.jpg
    python python/train_domain.py --device cuda --cuda-graph   # on a GPU, the steps replayed from a CUDA graph

Without --data it writes a small offline digits domain (prepare_digits) to a
temporary directory. With random weights the accuracy only shows that the loop
learns; use real weights (--weights, or the digits-demo on the pretrained
EfficientNet-Lite0) for real figures.
"""
import argparse
import os
import tempfile

import torch
import torchvision

from da2ext.models.backbones import load_state_dict_file
from da2ext.data.loaders import domain_loaders
from da2ext.data.digits import DOMAINS, prepare_digits
from da2ext.domains.multidomain import MultiDomainModel
from da2ext.training import evaluate, train_domain

MIB = float(2 ** 20)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a domain directory with train/ and val/ (default: a small digits domain)")
    parser.add_argument("--digits-domain", default="mnist", choices=DOMAINS,
                        help="the digits domain to write without --data (default: mnist)")
    parser.add_argument("--train-images", type=int, default=320,
                        help="training images of the digits domain written without --data (default: 320)")
    parser.add_argument("--val-images", type=int, default=100, help="its validation images (default: 100)")
    parser.add_argument("--weights", help="a torchvision resnet18 state_dict file (default: random weights)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--image-size", type=int, default=32, help="image height and width (default: 32)")
    parser.add_argument("--out", help="directory for the domain file and metrics (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data and shuffling (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the training step from a CUDA graph after the first step (on a CUDA device; "
                             "elsewhere the run is eager and says why)")
    return parser.parse_args()


def build_model(weights, seed, device):
    """A torchvision ResNet-18 (random weights, or the user's) wrapped for multi-domain learning with DA2."""
    torch.manual_seed(seed)
    backbone = torchvision.models.resnet18()
    if weights is not None:
        backbone.load_state_dict(load_state_dict_file(weights))  # never runs code from the file
    return MultiDomainModel(backbone, method="da2").to(device)


def run(args, out_dir):
    data_dir = args.data
    if data_dir is None:
        written = prepare_digits(os.path.join(out_dir, "data"), seed=args.seed, image_size=args.image_size,
                                 train_per_domain=args.train_images, val_per_domain=args.val_images,
                                 domains=(args.digits_domain,), progress=False)
        data_dir = written[args.digits_domain]["path"]
    name = os.path.basename(os.path.normpath(data_dir))
    train_loader, val_loader, class_names = domain_loaders(
        data_dir, backbone="resnet18", image_size=args.image_size, batch_size=args.batch_size, seed=args.seed)
    print("domain {}: {} classes, {} training and {} validation images".format(
        name, len(class_names), len(train_loader.dataset), len(val_loader.dataset)))

    model = build_model(args.weights, args.seed, args.device)
    model.add_domain(name, len(class_names), class_names)
    domain_path = os.path.join(out_dir, name + ".safetensors")
    metrics = train_domain(model, name, train_loader, val_loader, args.epochs, seed=args.seed,
                           metrics_path=os.path.join(out_dir, name + "-metrics.json"), domain_path=domain_path,
                           cuda_graph=args.cuda_graph)
    print("trainable parameters: {:,}".format(metrics["trainable_params"]))
    print("val accuracy: {:.1f} %".format(100.0 * metrics["final_val_accuracy"]))
    print("kept for backward: {:.2f} MiB per batch of {}".format(metrics["saved_bytes"] / MIB, args.batch_size))
    print("domain file: {} ({:.1f} KiB)".format(domain_path, metrics["file_bytes"] / 1024.0))
    if metrics["cuda_graph"] is not None:
        graph = metrics["cuda_graph"]
        print("CUDA graph: {} of {} steps replayed{}".format(graph["replayed_steps"], metrics["steps"],
                                                            "" if graph["captured"] else " ({})".format(graph["not_used"])))

    # Elsewhere (another process, another machine with the same backbone weights): load and use it.
    other = build_model(args.weights, args.seed, args.device)
    other.load_domain(domain_path)
    accuracy, _ = evaluate(other, name, val_loader)
    print("reloaded from the file: val accuracy {:.1f} % ({})".format(
        100.0 * accuracy, "the same" if accuracy == metrics["final_val_accuracy"] else "DIFFERENT"))
    return accuracy == metrics["final_val_accuracy"]


def main():
    args = parse_args()
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        same = run(args, args.out)
    else:
        with tempfile.TemporaryDirectory() as out_dir:
            same = run(args, out_dir)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
