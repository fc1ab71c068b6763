"""What a domain's images went through before the model saw them, recorded in
its domain file so that the file alone says how to feed it (predict, export):

    {"image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

an RGB image resized to image_size x image_size (bilinear, as torchvision's
Resize on a PIL image), scaled to [0, 1], then normalised per channel:
(x - mean) / std. The same steps as da2ext.data.loaders.image_transform without
augmentation, written with PIL and numpy alone, so that a deployed domain needs
neither torchvision nor da2ext's data code.
"""
import math

import numpy as np
import torch

__all__ = ["check_preprocessing", "image_batch", "image_tensor", "make_preprocessing"]


def make_preprocessing(image_size, normalization):
    """The record for images of `image_size` normalised with `normalization`, a
    (mean, std) pair of per-RGB-channel sequences."""
    mean, std = normalization
    record = {"image_size": int(image_size), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    problems = check_preprocessing(record)
    if problems:
        raise ValueError("preprocessing: " + "; ".join(problems))
    return record


def _channel_values(value):
    return (isinstance(value, list) and len(value) == 3 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def check_preprocessing(record):
    """What is wrong with a preprocessing record (read from a file), as a list of messages."""
    if not isinstance(record, dict):
        return ["preprocessing must be a JSON object, got {}".format(type(record).__name__)]
    problems = []
    size = record.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append("preprocessing image_size must be a positive int, got {!r}".format(size))
    for key in ("mean", "std"):
        if not _channel_values(record.get(key)):
            problems.append("preprocessing {} must be a list of 3 finite numbers (R, G, B), got {!r}".format(
                key, record.get(key)))
    if not problems and not all(v > 0 for v in record["std"]):
        problems.append("preprocessing std must be positive, got {!r}".format(record["std"]))
    return problems


def image_tensor(image, preprocessing):
    """A PIL image as the model's input: a float32 tensor 3 x S x S (S = image_size)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        raise TypeError("expected a PIL image, got {}".format(type(image).__name__))
    size = preprocessing["image_size"]
    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    values = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # S x S x 3 in [0, 1]
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((values - mean) / std).transpose(2, 0, 1)))


def image_batch(images, preprocessing):
    """PIL images as one N x 3 x S x S batch."""
    return torch.stack([image_tensor(image, preprocessing) for image in images])
