"""Image folders as users hand them over (issue "nothing lost, nothing silently
wrong", items 6 and 9): a symlink loop inside a class folder adds no image, and
--skip-bad-images leaves unreadable images out, counted and named, instead of
stopping the run."""
import os

import pytest

from da2ext.data.loaders import DataError, image_files, image_folder
from helpers import CLI_TINY, CLI_TINY_EVAL, run_cli, write_image_folder

pytest.importorskip("torchvision")


def _corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(40))


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_a_symlink_loop_in_a_class_folder_adds_no_image(tmp_path):
    root = str(tmp_path / "shapes")
    write_image_folder(root, train_per_class=3, val_per_class=1)
    before = len(image_folder(os.path.join(root, "train")))
    circle = os.path.join(root, "train", "circle")
    os.makedirs(os.path.join(circle, "nested"))
    os.symlink(circle, os.path.join(circle, "nested", "loop"))  # a link back to its parent's parent
    os.symlink(os.path.join(circle, "nested"), os.path.join(circle, "nested_again"))  # the same folder twice
    dataset = image_folder(os.path.join(root, "train"))
    assert len(dataset) == before == 12
    assert len(image_files(circle, lambda p: p.endswith(".png"))) == 3


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")
def test_a_symlinked_class_folder_is_still_read(tmp_path):
    root = str(tmp_path / "shapes")
    write_image_folder(root, train_per_class=2, val_per_class=1)
    elsewhere = str(tmp_path / "elsewhere")
    os.rename(os.path.join(root, "train", "square"), elsewhere)
    os.symlink(elsewhere, os.path.join(root, "train", "square"))
    dataset = image_folder(os.path.join(root, "train"))
    assert len(dataset) == 8 and dataset.targets.count(dataset.class_to_idx["square"]) == 2


def test_skip_bad_images_leaves_them_out_and_names_them(tmp_path):
    root = str(tmp_path / "shapes")
    write_image_folder(root, train_per_class=3, val_per_class=1)
    broken = os.path.join(root, "train", "circle", "001.png")
    _corrupt(broken)
    dataset = image_folder(os.path.join(root, "train"), skip_bad_images=True)
    assert len(dataset) == 11 and dataset.skipped_images == [broken]
    assert broken not in [p for p, _ in dataset.samples] and len(dataset.targets) == 11
    with pytest.raises(DataError, match="cannot read image .*001.png"):
        dataset = image_folder(os.path.join(root, "train"))
        [dataset[i] for i in range(len(dataset))]


def test_a_folder_of_only_unreadable_images_is_refused(tmp_path):
    root = str(tmp_path / "shapes")
    write_image_folder(root, train_per_class=1, val_per_class=1)
    for name in os.listdir(os.path.join(root, "val")):
        for image in os.listdir(os.path.join(root, "val", name)):
            _corrupt(os.path.join(root, "val", name, image))
    with pytest.raises(DataError, match="holds no readable images"):
        image_folder(os.path.join(root, "val"), skip_bad_images=True)


def test_train_and_eval_with_skip_bad_images_report_what_they_left_out(tmp_path, capsys):
    data = str(tmp_path / "shapes")
    write_image_folder(data, train_per_class=2, val_per_class=2)
    _corrupt(os.path.join(data, "train", "circle", "000.png"))
    _corrupt(os.path.join(data, "val", "square", "001.png"))
    runs = str(tmp_path / "runs")
    status, out, err = run_cli(["train", "--data", data, "--workdir", runs, "--epochs", "1", "--skip-bad-images"]
                               + CLI_TINY, capsys)
    assert status == 0, err
    assert "skipped 1 unreadable image(s) in {}: {}".format(
        os.path.join(data, "train"), os.path.join(data, "train", "circle", "000.png")) in err
    assert "skipped 1 unreadable image(s) in {}".format(os.path.join(data, "val")) in err
    status, out, err = run_cli(["eval", "--data", str(tmp_path), "--workdir", runs, "--skip-bad-images"]
                               + CLI_TINY_EVAL, capsys)
    assert status == 0, err
    assert "| shapes | 7 |" in out and "001.png" in err
