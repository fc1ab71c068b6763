"""MultiDomainModel.predict: a learned domain's top-k classes for images.

The model runs as at evaluation: eval mode, no autograd, the domain's tensors
in place; whatever mode and domain it had come back afterwards, so predicting
in the middle of training changes nothing. PIL images are prepared as the
domain's file records (preprocessing.py); tensors are taken as prepared.
"""
import torch

from .preprocessing import image_batch

__all__ = ["predict_images", "top_classes"]


def _as_batch(images, preprocessing, domain):
    """`images` as one N x 3 x H x W float tensor."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError("predict: a tensor of images must be N x 3 x H x W (or 3 x H x W), got shape {}".format(
                tuple(images.shape)))
        if not batch.is_floating_point():
            raise TypeError("predict: a tensor of images must be prepared floats (normalised), got {}".format(
                batch.dtype))
        return batch
    if not isinstance(images, (list, tuple)):
        images = [images]
    if preprocessing is None:
        raise ValueError("predict: domain {!r} records no preprocessing (its file predates da2ext's record of "
                         "image size and normalisation): pass a tensor of prepared images, or learn the domain "
                         "again".format(domain))
    return image_batch(images, preprocessing)


def top_classes(logits, class_names, topk):
    """Per row of `logits`, the `topk` classes by softmax probability:
    [{"class", "index", "probability"}, ...] from the most probable down."""
    probabilities = torch.softmax(logits.float(), dim=1)
    values, indices = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
    rows = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        rows.append([{"class": class_names[i] if class_names else str(i), "index": i, "probability": p}
                     for p, i in zip(row_values, row_indices)])
    return rows


def predict_images(model, images, domain=None, topk=5, batch_size=64):
    """MultiDomainModel.predict (see there)."""
    name = model.active_domain if domain is None else domain
    if name is None:
        raise RuntimeError("predict: no domain given and none active")
    info = model.domain_info(name)  # KeyError naming the domains when unknown
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError("predict: topk must be a positive int, got {!r}".format(topk))
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError("predict: batch_size must be a positive int, got {!r}".format(batch_size))
    batch = _as_batch(images, info["preprocessing"], name)
    if batch.shape[0] == 0:
        return []
    parameter = next(model.model.parameters())
    was_training = model.training
    rows = []
    model.eval()
    try:
        with model.domain(name), torch.no_grad():
            for start in range(0, batch.shape[0], batch_size):
                part = batch[start:start + batch_size].to(device=parameter.device)
                rows.extend(top_classes(model(part), info["class_names"], topk))
    finally:
        model.train(was_training)
    return rows
