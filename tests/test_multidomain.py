"""MultiDomainModel and its domain files: domains are independent, files round-trip
bit-exactly, and a damaged or mismatched file is refused with the model unchanged."""
import glob
import os

import numpy as np
import pytest
import torch
import torchvision

from da2ext import DomainFileError, MultiDomainModel
from da2ext.domains.domain_file import read_domain_file, write_domain_file


def resnet18(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18()


@pytest.fixture
def inputs():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def train_steps(model, inputs, steps=2, seed=0):
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.Adam(model.param_groups())
    targets = torch.randint(0, model.domain_info(model.active_domain)["num_classes"], (inputs.shape[0],))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def logits(model, name, inputs):
    model.eval()
    with torch.no_grad(), model.domain(name):
        return model(inputs).clone()


@pytest.mark.parametrize("method", ["da2", "ft"])
def test_learning_a_new_domain_leaves_earlier_ones_bit_identical(method, inputs):
    model = MultiDomainModel(resnet18(), method=method)
    model.add_domain("first", 10)
    model.set_domain("first")
    train_steps(model, inputs)
    before = logits(model, "first", inputs)
    model.add_domain("second", 3)
    model.set_domain("second")
    train_steps(model, inputs, seed=1)
    assert logits(model, "second", inputs).shape == (4, 3)
    assert torch.equal(logits(model, "first", inputs), before)


def test_domains_have_their_own_head_sizes_and_the_context_restores(inputs):
    model = MultiDomainModel(resnet18())
    model.add_domain("a", 10, class_names=[str(i) for i in range(10)])
    model.add_domain("b", 2)
    assert model.domains == ["a", "b"]
    model.set_domain("a")
    with model.domain("b"):
        assert model.active_domain == "b"
        assert model(inputs).shape == (4, 2)
    assert model.active_domain == "a"
    assert model(inputs).shape == (4, 10)
    assert model.domain_info("a")["class_names"][3] == "3"
    # A new domain starts from the template: gamma = 0, so its adaptors compute the identity.
    model.set_domain("b")
    gammas = [p for name, p in model.model.named_parameters() if name.endswith("gamma")]
    assert gammas and all(bool((g == 0).all()) for g in gammas)


def test_bad_use_gives_clear_errors(inputs):
    model = MultiDomainModel(resnet18())
    with pytest.raises(RuntimeError, match="no active domain"):
        model(inputs)
    model.add_domain("a", 10)
    with pytest.raises(ValueError, match="exists already"):
        model.add_domain("a", 10)
    with pytest.raises(ValueError, match="num_classes"):
        model.add_domain("b", 0)
    with pytest.raises(ValueError, match="class_names"):
        model.add_domain("b", 3, class_names=["x"])
    with pytest.raises(KeyError, match="no domain 'zzz'"):
        model.set_domain("zzz")
    with pytest.raises(ValueError, match="unknown method"):
        MultiDomainModel(resnet18(), method="nope")


@pytest.mark.parametrize("use_safetensors", [True, False], ids=["safetensors", "npz"])
def test_save_and_load_round_trip_bit_exactly(use_safetensors, inputs, tmp_path):
    if use_safetensors:
        pytest.importorskip("safetensors")
    model = MultiDomainModel(resnet18())
    model.add_domain("digits", 10, class_names=list("0123456789"))
    model.set_domain("digits")
    train_steps(model, inputs)
    expected = logits(model, "digits", inputs)
    path = str(tmp_path / "digits.domain")
    model.save_domain("digits", path, use_safetensors=use_safetensors)

    other = MultiDomainModel(resnet18())  # same weights: same seed
    assert other.load_domain(path) == "digits"
    assert other.domain_info("digits")["class_names"] == list("0123456789")
    assert torch.equal(logits(other, "digits", inputs), expected)
    assert other.load_domain(path, name="copy") == "copy"


def saved_domain(tmp_path, model=None):
    model = model or MultiDomainModel(resnet18())
    model.add_domain("a", 10)
    path = str(tmp_path / "a.safetensors")
    model.save_domain("a", path)
    return path


def assert_refused_and_unchanged(model, path, match):
    domains = model.domains
    state = dict((k, v.clone()) for k, v in model.state_dict().items())
    with pytest.raises(DomainFileError, match=match):
        model.load_domain(path, name="new")
    assert model.domains == domains
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_truncated_file_is_refused_and_changes_nothing(tmp_path):
    pytest.importorskip("safetensors")
    path = saved_domain(tmp_path)
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 40, 5):
        damaged = str(tmp_path / "cut{}.safetensors".format(cut))
        with open(damaged, "wb") as f:
            f.write(data[:cut])
        model = MultiDomainModel(resnet18())
        model.add_domain("kept", 4)
        assert_refused_and_unchanged(model, damaged, "damaged|truncated|not a da2ext")


def test_file_for_another_backbone_or_method_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    path = saved_domain(tmp_path)
    other_weights = MultiDomainModel(resnet18(seed=1))
    assert_refused_and_unchanged(other_weights, path, "backbone_fingerprint")
    torch.manual_seed(0)
    other_architecture = MultiDomainModel(torchvision.models.resnet34())
    assert_refused_and_unchanged(other_architecture, path, "architecture")
    other_method = MultiDomainModel(resnet18(), method="da2_adaptor_only")
    assert_refused_and_unchanged(other_method, path, "method")


def test_tampered_tensors_are_refused(tmp_path):
    pytest.importorskip("safetensors")
    path = saved_domain(tmp_path)
    tensors, meta = read_domain_file(path)
    model = MultiDomainModel(resnet18())

    name = [k for k in tensors if k.endswith("gamma")][0]
    wrong_shape = dict(tensors, **{name: torch.zeros(3)})
    write_domain_file(str(tmp_path / "shape.safetensors"), wrong_shape, meta)
    assert_refused_and_unchanged(model, str(tmp_path / "shape.safetensors"), name)

    not_finite = dict(tensors, **{name: torch.full_like(tensors[name], float("nan"))})
    write_domain_file(str(tmp_path / "nan.safetensors"), not_finite, meta)
    assert_refused_and_unchanged(model, str(tmp_path / "nan.safetensors"), "non-finite")

    missing = dict((k, v) for k, v in tensors.items() if k != name)
    write_domain_file(str(tmp_path / "missing.safetensors"), missing, meta)
    assert_refused_and_unchanged(model, str(tmp_path / "missing.safetensors"), "missing")

    head = [k for k in tensors if k.startswith("fc.")][0]
    wrong_classes = dict(meta, num_classes=7)
    write_domain_file(str(tmp_path / "classes.safetensors"), tensors, wrong_classes)
    assert_refused_and_unchanged(model, str(tmp_path / "classes.safetensors"), head)


def test_files_that_are_not_domain_files_are_refused(tmp_path):
    model = MultiDomainModel(resnet18())
    garbage = str(tmp_path / "garbage.safetensors")
    with open(garbage, "wb") as f:
        f.write(os.urandom(1000))
    assert_refused_and_unchanged(model, garbage, "damaged|not a da2ext")

    st = pytest.importorskip("safetensors.torch")
    plain = str(tmp_path / "plain.safetensors")
    st.save_file({"x": torch.zeros(2)}, plain)
    assert_refused_and_unchanged(model, plain, "not a da2ext domain file")


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    path = str(tmp_path / "evil.npz")
    with open(path, "wb") as f:
        np.savez(f, __da2ext_metadata__=np.frombuffer(b"{}", dtype=np.uint8), x=np.array([object()], dtype=object))
    assert_refused_and_unchanged(MultiDomainModel(resnet18()), path, "damaged|not a da2ext|pickle")


def test_an_interrupted_save_keeps_the_earlier_file(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    model = MultiDomainModel(resnet18())
    path = saved_domain(tmp_path, model)
    before = open(path, "rb").read()

    import da2ext.domains.domain_file as domain_file

    def interrupted(path, write, mode="wb"):
        from da2ext.domains.atomic_file import atomic_write

        def write_half_then_fail(f):
            f.write(b"partial")
            raise KeyboardInterrupt()
        atomic_write(path, write_half_then_fail, mode)

    monkeypatch.setattr(domain_file, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_domain("a", path)
    assert open(path, "rb").read() == before
    assert glob.glob(str(tmp_path / ".*partial")) == []


@pytest.mark.parametrize("change, match", [
    ({"class_names": ["x", "y"]}, "class_names .* is not a list of num_classes=10 strings"),
    ({"class_names": "0123456789"}, "class_names .* is not a list of num_classes=10 strings"),
    ({"class_names": dict((str(i), i) for i in range(10))}, "class_names .* is not a list"),
    ({"class_names": list(range(10))}, "class_names .* is not a list of num_classes=10 strings"),
    ({"num_classes": True}, "num_classes True is not a positive int"),
    ({"name": ["a"]}, "the domain's name \\['a'\\] is not a non-empty string"),
])
def test_metadata_of_the_wrong_kind_is_refused_and_changes_nothing(tmp_path, change, match):
    pytest.importorskip("safetensors")
    tensors, meta = read_domain_file(saved_domain(tmp_path))
    meta.update(change)
    path = str(tmp_path / "tampered.safetensors")
    write_domain_file(path, tensors, meta)
    model = MultiDomainModel(resnet18())
    model.add_domain("kept", 4)
    assert_refused_and_unchanged(model, path, match)


def test_metadata_that_is_not_an_object_or_a_directory_is_a_domain_file_error(tmp_path):
    pytest.importorskip("safetensors")
    tensors, _ = read_domain_file(saved_domain(tmp_path))
    path = str(tmp_path / "list.safetensors")
    write_domain_file(path, tensors, ["not", "an", "object"])
    model = MultiDomainModel(resnet18())
    assert_refused_and_unchanged(model, path, "its metadata is a JSON list, not an object")
    os.mkdir(str(tmp_path / "folder.safetensors"))
    assert_refused_and_unchanged(model, str(tmp_path / "folder.safetensors"), "is a directory")
