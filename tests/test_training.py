"""The training loop and workflow (da2ext.training) and the loaders (da2ext.data):
a tiny domain trains end to end with every first method, an interrupted run
resumes to the very weights of an uninterrupted one, the metrics JSON has its
keys, bad data directories say what is wrong.

Small on purpose: a randomly initialised ResNet-18 at 32x32 on a synthetic
ImageFolder of 4 classes, so the file runs in well under a minute on 2 cores.
"""
import json
import os

import numpy as np
import pytest
import torch

from da2ext import methods
from da2ext.data.loaders import DataError, domain_loaders, stratified_subsample, val_loader
from da2ext.profiling import SavedTensorCounter, model_state
from da2ext.training import loop
from da2ext.training.workflow import build_model
from helpers import CLASSES, IMAGE_SIZE, write_image_folder


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data") / "shapes"))


def _model(method="da2"):
    return build_model("resnet18", method, pretrained=False, seed=0)


def _loaders(shapes_dir, subsample=None):
    return domain_loaders(shapes_dir, backbone="resnet18", image_size=IMAGE_SIZE, batch_size=16,
                          subsample=subsample, seed=0)


def _trained(model, name, shapes_dir, epochs, **kwargs):
    train_loader, val, classes = _loaders(shapes_dir)
    if name not in model.domains:
        model.add_domain(name, len(classes), classes)
    return loop.train_domain(model, name, train_loader, val, epochs, progress=False, **kwargs)


def _weights(model, name):
    return dict((slot, t.detach().clone()) for slot, t in model.domain_tensors(name).items())


def test_train_domain_end_to_end(shapes_dir, tmp_path):
    model = _model()
    metrics_path = str(tmp_path / "metrics" / "shapes.json")
    checkpoint_path = str(tmp_path / "checkpoints" / "shapes.pt")
    domain_path = str(tmp_path / "domains" / "shapes.safetensors")
    metrics = _trained(model, "shapes", shapes_dir, 2, metrics_path=metrics_path, checkpoint_path=checkpoint_path,
                       domain_path=domain_path, settings={"note": "test"})

    with open(metrics_path) as f:
        recorded = json.load(f)
    for key in ("method", "domain", "epochs", "train_loss", "train_accuracy", "val_accuracy", "val_loss",
                "saved_bytes", "trainable_params", "step_time", "total_time", "file_bytes", "settings"):
        assert key in recorded, key
    assert recorded["method"] == "da2" and recorded["domain"] == "shapes" and recorded["epochs"] == 2
    assert len(recorded["train_loss"]) == len(recorded["val_accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in recorded["val_accuracy"] + recorded["train_accuracy"])
    assert recorded["saved_bytes"] > 0 and recorded["trainable_params"] > 0 and recorded["step_time"] > 0
    assert recorded["file_bytes"] == os.path.getsize(domain_path)
    assert recorded["settings"]["note"] == "test" and recorded["settings"]["train_images"] == 32
    rates = methods.get("da2").learning_rates
    assert recorded["learning_rates"] == dict((g, rates[g]) for g in ("adaptors", "branches", "head", "shifts"))
    assert metrics["final_val_accuracy"] == recorded["val_accuracy"][-1]
    assert not os.path.exists(checkpoint_path), "the checkpoint stays after the domain file is written"

    # The file holds exactly the trained domain; evaluate gives the last epoch's figures.
    other = _model()
    other.load_domain(domain_path)
    _, val, _ = _loaders(shapes_dir)
    accuracy, loss = loop.evaluate(other, "shapes", val)
    assert accuracy == recorded["val_accuracy"][-1] and loss == pytest.approx(recorded["val_loss"][-1], rel=1e-6)

    # Learning another domain leaves this one bit-identical.
    before = _weights(model, "shapes")
    _trained(model, "second", shapes_dir, 1)
    after = _weights(model, "shapes")
    assert all(torch.equal(before[slot], after[slot]) for slot in before)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("calibrate", [False, True], ids=["plain", "calibrate_shifts"])
def test_resume_after_interruption_gives_the_same_weights(shapes_dir, tmp_path, monkeypatch, calibrate):
    """A resumed run continues bit-identically; with calibrate_shifts, the checkpoint
    holds the calibrated shifts and the resumed run does not calibrate again."""
    uninterrupted = _model()
    reference = _trained(uninterrupted, "shapes", shapes_dir, 2, calibrate_shifts=calibrate)
    assert (reference["calibrated_layers"] or 0) > 0 if calibrate else reference["calibrated_layers"] is None

    checkpoint_path = str(tmp_path / "run.pt")
    save = loop.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise _Interrupted()

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        _trained(_model(), "shapes", shapes_dir, 2, checkpoint_path=checkpoint_path, calibrate_shifts=calibrate)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert os.path.exists(checkpoint_path)

    resumed_model = _model()  # a new process would build everything again
    resumed = _trained(resumed_model, "shapes", shapes_dir, 2, checkpoint_path=checkpoint_path,
                       calibrate_shifts=calibrate)
    assert resumed["resumed_from_epoch"] == 1 and resumed["calibrated_layers"] is None
    assert resumed["val_accuracy"] == reference["val_accuracy"]
    assert resumed["train_loss"] == reference["train_loss"]
    expected, actual = _weights(uninterrupted, "shapes"), _weights(resumed_model, "shapes")
    differing = [slot for slot in expected if not torch.equal(expected[slot], actual[slot])]
    assert not differing, "resumed weights differ from the uninterrupted run's: {}".format(differing[:5])

    # A checkpoint of other settings is not resumed from: the run starts over and replaces it.
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        _trained(_model(), "shapes", shapes_dir, 3, checkpoint_path=checkpoint_path, calibrate_shifts=calibrate)
    state = loop.load_checkpoint(checkpoint_path)
    assert state["epochs_done"] == 1 and state["settings"]["epochs"] == 3


@pytest.mark.parametrize("method", ["ft", "last", "bias"])
def test_other_methods_train(method, shapes_dir):
    model = _model(method)
    metrics = _trained(model, "shapes", shapes_dir, 1)
    assert metrics["method"] == method and len(metrics["val_accuracy"]) == 1
    assert np.isfinite(metrics["train_loss"][0]) and metrics["saved_bytes"] > 0


def test_da2_keeps_less_than_plain_bias_and_ft(shapes_dir):
    kept = {}
    for method in ("da2", "bias", "ft"):
        model = _model(method)
        train_loader, _, classes = _loaders(shapes_dir)
        model.add_domain("shapes", len(classes))
        model.set_domain("shapes")
        images, labels = next(iter(train_loader))
        with SavedTensorCounter(exclude=model_state(model)) as counter:
            torch.nn.functional.cross_entropy(model(images), labels)
        kept[method] = counter.saved_bytes
    assert kept["da2"] < kept["bias"] < kept["ft"], kept


def test_subsample_is_seeded_and_spread_over_classes():
    targets = [c for c in range(4) for _ in range(25)]
    chosen = stratified_subsample(targets, 20, seed=3)
    assert chosen == stratified_subsample(targets, 20, seed=3) and len(set(chosen)) == 20
    assert np.bincount(np.asarray(targets)[chosen]).tolist() == [5, 5, 5, 5]
    assert stratified_subsample(targets, 1000, seed=3) == list(range(100))
    with pytest.raises(ValueError):
        stratified_subsample(targets, 0, seed=3)


def test_subsampled_loaders(shapes_dir):
    train_loader, val, classes = _loaders(shapes_dir, subsample=8)
    assert classes == list(CLASSES)
    assert len(train_loader.dataset) == 8 and len(val.dataset) == 8
    images, labels = next(iter(train_loader))
    assert images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32


def test_data_errors_say_what_is_wrong(tmp_path, shapes_dir):
    with pytest.raises(DataError, match="does not exist"):
        domain_loaders(str(tmp_path / "nowhere"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="only_train has no val/"):  # named before any image is read
        domain_loaders(str(tmp_path / "only_train"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        domain_loaders(str(tmp_path / "empty"))
    loader, classes = val_loader(shapes_dir, backbone="resnet18", image_size=IMAGE_SIZE)
    assert classes == list(CLASSES) and len(loader.dataset) == 16
