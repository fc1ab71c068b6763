"""A domain's images: DIR/train and DIR/val as ImageFolder trees (one folder per
class), read the same way whether prepare_digits wrote them or a user did.

Reproducible by construction: no augmentation by default (a resize, then the
normalisation the backbone was trained with), subsamples drawn with a seeded
numpy RandomState, and a training loader whose shuffling comes from its own
seeded torch.Generator (loader.generator), which a checkpoint saves and
restores so that a resumed run sees the same batches as an uninterrupted one.
Loading runs in the main process by default (num_workers=0): PNG decoding is
cheap next to a training step, and worker processes would add their own seeds.

Where torchvision's ImageFolder would go wrong, the boundary is here: it follows
symlinked directories without noticing a loop (a link to a parent folder
multiplies the images), so class folders are walked by image_files, which reads
each real directory once; an unreadable image stops a run naming the file
(load_rgb), or with skip_bad_images=True is left out, counted and named.
"""
import os
import sys

import numpy as np
import torch

from ..models.backbones import imagenet_normalization

__all__ = ["DataError", "check_domain_dir", "domain_loaders", "image_files", "image_folder", "image_transform",
           "report_skipped", "stratified_subsample", "val_loader"]


class DataError(ValueError):
    """A domain directory that is missing, empty or inconsistent."""


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ImportError("reading ImageFolder directories needs torchvision: pip install torchvision")
    return torchvision


# Pillow opens 16-bit greyscale PNGs and TIFFs as "I;16*" (or "I", 32-bit integers, in older
# versions), and its convert("RGB") clips those values at 255 instead of scaling them: a
# 16-bit image would come out nearly all white. They are scaled to 8 bits first.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(path):
    """The image at `path` as an 8-bit RGB PIL image (16-bit greyscale scaled, not
    clipped); DataError naming the file when it cannot be read as an image."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except (OSError, SyntaxError, ValueError) as error:  # truncated, corrupt, or not an image
        raise DataError("cannot read image {}: {}".format(path, error))
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def image_transform(image_size, normalization, augment=False):
    """PIL image -> normalised float tensor 3 x image_size x image_size.

    normalization: (mean, std) per RGB channel of values in [0, 1]
    (backbones.imagenet_normalization). augment: a light random crop after a
    small padding (off by default, for reproducible figures)."""
    transforms = _torchvision().transforms
    # load_rgb gives RGB images already (grey, 16-bit and palette images converted).
    steps = [transforms.Resize((image_size, image_size))]
    if augment:
        steps.append(transforms.RandomCrop(image_size, padding=max(1, image_size // 16), padding_mode="edge"))
    mean, std = normalization
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def image_files(class_dir, is_image):
    """The files under class_dir (sub-folders included) for which is_image(path)
    holds, sorted. Symlinked directories are followed, but each real directory is
    read once: a link back to a parent (a loop) or a second link to the same
    folder adds nothing (os.walk(followlinks=True), which ImageFolder uses, would
    descend into a loop until the path grows too long)."""
    seen, files = set(), []
    for root, dirs, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []  # read already: a loop or a duplicate link
            continue
        seen.add(real)
        dirs.sort()
        files.extend(os.path.join(root, name) for name in names if is_image(os.path.join(root, name)))
    return sorted(files)


_IMAGE_FOLDER_CLASS = []


def _image_folder_class():
    """ImageFolder with image_files as its walk (built on first use: torchvision is optional)."""
    if not _IMAGE_FOLDER_CLASS:
        folder = _torchvision().datasets.folder

        class LoopSafeImageFolder(folder.ImageFolder):
            @staticmethod
            def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
                if is_valid_file is None:
                    def is_valid_file(path):
                        return folder.has_file_allowed_extension(path, extensions)
                samples, empty = [], []
                for name in sorted(class_to_idx):
                    files = image_files(os.path.join(directory, name), is_valid_file)
                    samples.extend((path, class_to_idx[name]) for path in files)
                    if not files:
                        empty.append(name)
                if empty and not allow_empty:
                    raise FileNotFoundError("found no images for the class(es) {}".format(", ".join(empty)))
                return samples

        _IMAGE_FOLDER_CLASS.append(LoopSafeImageFolder)
    return _IMAGE_FOLDER_CLASS[0]


def _readable(path):
    try:
        load_rgb(path)
    except DataError:
        return False
    return True


def image_folder(split_dir, transform=None, skip_bad_images=False):
    """torchvision's ImageFolder of split_dir (e.g. DIR/train), with an error that
    says what is wrong when it is missing or holds no images.

    skip_bad_images: read every image once now and leave out those that cannot be
    read (dataset.skipped_images lists them); otherwise the first one stops
    whatever reads it with a DataError naming it."""
    if not os.path.isdir(split_dir):
        raise DataError("{} is not a directory: a domain directory needs train/ and val/, each with one "
                        "sub-directory of images per class".format(split_dir))
    try:
        dataset = _image_folder_class()(split_dir, transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as error:  # no class folders, or no images in them
        raise DataError("{} holds no images in class sub-directories ({})".format(split_dir, error))
    dataset.skipped_images = []
    if skip_bad_images:
        kept = []
        for sample in dataset.samples:  # sorted by path already
            (kept if _readable(sample[0]) else dataset.skipped_images).append(sample)
        dataset.skipped_images = [path for path, _ in dataset.skipped_images]
        dataset.samples = dataset.imgs = kept
        dataset.targets = [target for _, target in kept]
    if len(dataset) == 0:
        raise DataError("{} holds no {}images".format(split_dir, "readable " if dataset.skipped_images else ""))
    return dataset


def report_skipped(dataset, stream=None):
    """Print, once per dataset, how many unreadable images image_folder(skip_bad_images=True) left out
    of `dataset` (an image folder or a Subset of one) and the first few of them."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    skipped = getattr(base, "skipped_images", [])
    if not skipped or getattr(base, "skipped_reported", False):
        return
    base.skipped_reported = True
    shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    print("skipped {} unreadable image(s) in {}: {}".format(len(skipped), base.root, shown),
          file=stream or sys.stderr)


def stratified_subsample(targets, count, seed):
    """Indices of `count` items (all if count is None or >= len(targets)), spread
    over the classes as evenly as their sizes allow, drawn with a seeded
    RandomState, returned sorted (the loader shuffles)."""
    targets = np.asarray(targets)
    if count is None or count >= len(targets):
        return list(range(len(targets)))
    if count < 1:
        raise ValueError("subsample must be a positive number of images, got {}".format(count))
    rng = np.random.RandomState(seed)
    by_class = [rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)]
    # Round-robin over the shuffled classes: class sizes permitting, equal shares.
    chosen, depth = [], 0
    while len(chosen) < count:
        for members in by_class:
            if depth < len(members) and len(chosen) < count:
                chosen.append(int(members[depth]))
        depth += 1
    return sorted(chosen)


def _loader(dataset, batch_size, shuffle, seed, num_workers):
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       generator=generator, drop_last=False)


def check_domain_dir(data_dir, splits=("train", "val")):
    """Raise DataError unless data_dir and its split directories exist (a cheap
    check before anything slow; image_folder checks the images)."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError("domain directory {} does not exist".format(data_dir))
    missing = [s for s in splits if not os.path.isdir(os.path.join(data_dir, s))]
    if missing:
        raise DataError("{} has no {}: a domain directory needs train/ and val/, each with one sub-directory "
                        "of images per class".format(data_dir, " or ".join(m + "/" for m in missing)))


def _check_domain_dir(data_dir, batch_size, splits):
    check_domain_dir(data_dir, splits)  # a missing split is named before any image is read
    if int(batch_size) < 1:
        raise ValueError("batch_size must be >= 1, got {}".format(batch_size))


def _classes(dataset):
    return list(dataset.dataset.classes if isinstance(dataset, torch.utils.data.Subset) else dataset.classes)


def _val_dataset(data_dir, backbone, image_size, subsample, seed, skip_bad_images):
    val = image_folder(os.path.join(data_dir, "val"), image_transform(image_size, imagenet_normalization(backbone)),
                       skip_bad_images)
    if subsample is not None:
        val = torch.utils.data.Subset(val, stratified_subsample(val.targets, subsample, seed + 1))
    return val


def val_loader(data_dir, backbone="efficientnet_lite0", image_size=64, batch_size=64, subsample=None, seed=0,
               num_workers=0, skip_bad_images=False):
    """(loader, class_names) of data_dir/val alone, in directory order (for evaluation)."""
    data_dir = os.fspath(data_dir)
    _check_domain_dir(data_dir, batch_size, ("val",))
    val = _val_dataset(data_dir, backbone, image_size, subsample, seed, skip_bad_images)
    return _loader(val, batch_size, False, seed, num_workers), _classes(val)


def domain_loaders(data_dir, backbone="efficientnet_lite0", image_size=64, batch_size=64, subsample=None, seed=0,
                   num_workers=0, augment=False, skip_bad_images=False):
    """(train_loader, val_loader, class_names) for the domain in data_dir.

    data_dir/train and data_dir/val must be ImageFolder trees with the same
    classes. Images are resized to image_size and normalised as `backbone`
    expects. subsample: at most this many images per split (seeded, spread over
    the classes), for quick runs. The train loader shuffles with its own seeded
    generator; the val loader keeps the directory order. skip_bad_images: see
    image_folder (report_skipped prints what was left out).
    """
    data_dir = os.fspath(data_dir)
    _check_domain_dir(data_dir, batch_size, ("train", "val"))
    train = image_folder(os.path.join(data_dir, "train"),
                         image_transform(image_size, imagenet_normalization(backbone), augment), skip_bad_images)
    val = _val_dataset(data_dir, backbone, image_size, subsample, seed, skip_bad_images)
    if train.classes != _classes(val):
        raise DataError("{}: train/ and val/ have different classes ({} and {})".format(
            data_dir, train.classes, _classes(val)))
    if subsample is not None:
        train = torch.utils.data.Subset(train, stratified_subsample(train.targets, subsample, seed))
    return (_loader(train, batch_size, True, seed, num_workers),
            _loader(val, batch_size, False, seed, num_workers),
            _classes(val))
