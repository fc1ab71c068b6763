"""Using a learned domain: MultiDomainModel.predict, `python -m da2ext predict`,
the plain inference model (da2ext.deploy.inference_model) and its ONNX and
TorchScript files, which run without da2ext with the same logits."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from da2ext import ResidualAttentionAdaptor
from da2ext.data.loaders import image_transform, load_rgb
from da2ext.deploy import export_domain, inference_model
from da2ext.domains.domain_file import DomainFileError, read_domain_file, write_domain_file
from da2ext.domains.preprocessing import check_preprocessing, image_tensor, make_preprocessing
from da2ext.lean.adapt import remove_memory_order_hook
from da2ext.lean.frozen_conv import FrozenConvBNAct
from da2ext.models.backbones import imagenet_normalization
from da2ext.nn.low_rank_branch import LowRankConvBranch
from da2ext.training.workflow import WorkDir, build_model, learn_domain
from helpers import CLASSES, relative_error, run_cli, write_image_folder

IMAGE_SIZE = 32
MODEL_ARGS = ["--backbone", "resnet18", "--no-pretrained"]


def _learned(root, method="da2"):
    data = write_image_folder(os.path.join(root, "shapes"), train_per_class=4, val_per_class=3)
    model = build_model("resnet18", method, pretrained=False, seed=0)
    learn_domain(model, WorkDir(os.path.join(root, "runs")), "shapes", data, epochs=1, batch_size=8,
                 image_size=IMAGE_SIZE, backbone="resnet18", progress=False)
    with torch.no_grad():  # a trained-looking domain: every adaptor and shift away from its start
        generator = torch.Generator().manual_seed(3)
        for name, tensor in model.domain_tensors("shapes").items():
            if tensor.is_floating_point() and (".gamma" in name or name.endswith(".shift")):
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return model, data


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    pytest.importorskip("torchvision")
    root = str(tmp_path_factory.mktemp("learned"))
    model, data = _learned(root)
    return model, data, os.path.join(root, "runs")


def val_images(data):
    paths = sorted(os.path.join(data, "val", c, f) for c in CLASSES for f in os.listdir(os.path.join(data, "val", c)))
    return paths, [load_rgb(p) for p in paths]


# ------------------------------------------------------------------------------------------
# The preprocessing a domain file records


def test_preprocessing_matches_the_training_transform():
    from PIL import Image
    record = make_preprocessing(IMAGE_SIZE, imagenet_normalization("resnet18"))
    transform = image_transform(IMAGE_SIZE, imagenet_normalization("resnet18"))
    generator = torch.Generator().manual_seed(0)
    for size, mode in [((45, 37), "RGB"), ((20, 64), "L"), ((32, 32), "RGB")]:
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels).convert(mode).convert("RGB")
        assert torch.allclose(image_tensor(image, record), transform(image), atol=1e-6)


@pytest.mark.parametrize("record,message", [
    ({"image_size": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}, "image_size"),
    ({"image_size": 32, "mean": [0, 0], "std": [1, 1, 1]}, "mean"),
    ({"image_size": 32, "mean": [0, 0, 0], "std": [1, 0, 1]}, "std must be positive"),
    ({"image_size": 32, "mean": [0, 0, float("nan")], "std": [1, 1, 1]}, "mean"),
    ([32], "JSON object"),
])
def test_bad_preprocessing_records_are_named(record, message):
    assert any(message in problem for problem in check_preprocessing(record))


def test_a_domain_file_with_bad_preprocessing_is_refused(learned, tmp_path):
    model, _, runs = learned
    tensors, meta = read_domain_file(dict(WorkDir(runs).domain_files("da2"))["shapes"])
    meta["preprocessing"]["std"] = [1.0, -1.0, 1.0]
    path = str(tmp_path / "bad.safetensors")
    write_domain_file(path, tensors, meta)
    other = build_model("resnet18", "da2", pretrained=False, seed=0)
    with pytest.raises(DomainFileError, match="std must be positive"):
        other.load_domain(path)


def test_the_domain_file_records_its_preprocessing(learned):
    model, _, runs = learned
    _, meta = read_domain_file(dict(WorkDir(runs).domain_files("da2"))["shapes"])
    assert meta["preprocessing"] == make_preprocessing(IMAGE_SIZE, imagenet_normalization("resnet18"))
    assert meta["class_names"] == list(CLASSES)


# ------------------------------------------------------------------------------------------
# MultiDomainModel.predict


def test_predict_takes_pil_images_or_prepared_tensors_alike(learned):
    model, data, _ = learned
    _, images = val_images(data)
    record = model.domain_info("shapes")["preprocessing"]
    from_pil = model.predict(images, domain="shapes", topk=3, batch_size=5)
    from_tensor = model.predict(torch.stack([image_tensor(i, record) for i in images]), domain="shapes", topk=3)
    assert len(from_pil) == len(images)
    for a, b in zip(from_pil, from_tensor):
        assert [p["index"] for p in a] == [p["index"] for p in b]
        assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-6)
        probabilities = [p["probability"] for p in a]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert all(p["class"] == CLASSES[p["index"]] for p in a)
    assert len(model.predict(images[0], domain="shapes", topk=10)[0]) == len(CLASSES)  # k clipped to the classes


def test_predict_agrees_with_evaluation(learned):
    # The training loader's transform and predict's preparation give the same top-1.
    model, data, _ = learned
    from da2ext.data.loaders import val_loader
    loader, _ = val_loader(data, backbone="resnet18", image_size=IMAGE_SIZE, batch_size=64)
    inputs, _ = next(iter(loader))
    model.eval()
    with model.domain("shapes"), torch.no_grad():
        expected = model(inputs).argmax(1).tolist()
    _, images = val_images(data)
    assert [row[0]["index"] for row in model.predict(images, domain="shapes")] == expected


def test_predict_restores_the_mode_and_the_active_domain(learned):
    model, data, _ = learned
    model.add_domain("other", 3) if "other" not in model.domains else None
    model.set_domain("other")
    model.train()
    model.predict(val_images(data)[1][:2], domain="shapes")
    assert model.training and model.active_domain == "other"


def test_predict_refuses_bad_arguments(learned):
    model, data, _ = learned
    image = val_images(data)[1][0]
    with pytest.raises(ValueError, match="topk"):
        model.predict([image], domain="shapes", topk=0)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model.predict(torch.zeros(2, 4, 8, 8), domain="shapes")
    with pytest.raises(TypeError, match="prepared floats"):
        model.predict(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), domain="shapes")
    with pytest.raises(KeyError, match="nope"):
        model.predict([image], domain="nope")
    model.add_domain("unprepared", 4) if "unprepared" not in model.domains else None
    with pytest.raises(ValueError, match="records no preprocessing"):
        model.predict([image], domain="unprepared")
    assert model.predict(torch.zeros(0, 3, 8, 8), domain="shapes") == []


# ------------------------------------------------------------------------------------------
# python -m da2ext predict


def test_predict_command_prints_a_table_and_json(learned, capsys):
    _, data, runs = learned
    status, out, err = run_cli(["predict", "--workdir", runs, "--domain", "shapes", "--no-progress", "--topk", "2",
                                os.path.join(data, "val")] + MODEL_ARGS, capsys)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "| image | top 1 | top 2 |" and len(lines) == 2 + 3 * len(CLASSES)
    status, out, err = run_cli(["predict", "--workdir", runs, "--domain", "shapes", "--json", "--no-progress",
                                os.path.join(data, "val", "circle")] + MODEL_ARGS, capsys)
    assert status == 0, err
    rows = json.loads(out)
    assert [os.path.basename(r["image"]) for r in rows] == ["000.png", "001.png", "002.png"]
    assert all(len(r["predictions"]) == len(CLASSES) and r["predictions"][0]["class"] in CLASSES for r in rows)


def test_predict_command_names_and_skips_bad_images(learned, capsys, tmp_path):
    _, data, runs = learned
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = os.path.join(data, "val", "square", "000.png")
    status, out, err = run_cli(["predict", "--workdir", runs, "--domain", "shapes", "--no-progress", good, str(bad),
                                str(tmp_path / "missing.png")] + MODEL_ARGS, capsys)
    assert status == 1
    assert "broken.png" in err and "missing.png" in err and "no such file" in err
    assert good in out and "broken.png" not in out
    status, _, err = run_cli(["predict", "--workdir", runs, "--domain", "shapes", "--no-progress", str(bad)]
                             + MODEL_ARGS, capsys)
    assert status == 2 and "none of the 1 image(s) could be read" in err


def test_predict_command_names_the_learned_domains(learned, capsys):
    _, data, runs = learned
    status, _, err = run_cli(["predict", "--workdir", runs, "--domain", "nope", data] + MODEL_ARGS, capsys)
    assert status == 2 and "no da2 domain 'nope'" in err and "learned there: shapes" in err


# ------------------------------------------------------------------------------------------
# The inference model and its files


def reference_logits(model, inputs):
    model.eval()
    with model.domain("shapes"), torch.no_grad():
        return model(inputs)


@pytest.mark.parametrize("method", ["da2", "da2_tail1", "bias_lean"])
def test_inference_model_computes_the_domains_logits_with_standard_ops(method, tmp_path):
    pytest.importorskip("torchvision")
    model, data = _learned(str(tmp_path), method)
    network = inference_model(model, "shapes")
    lean = [type(m).__name__ for m in network.modules()
            if isinstance(m, (FrozenConvBNAct, ResidualAttentionAdaptor, LowRankConvBranch))]
    assert not lean, lean
    assert not any(p.requires_grad for p in network.parameters())
    # the lean model's memory-order hook stays on the model and is not copied into the network
    assert remove_memory_order_hook(network) == 0 and remove_memory_order_hook(copy.deepcopy(model.model)) == 1
    inputs = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert relative_error(network(inputs), reference_logits(model, inputs)) < 1e-5


def _standalone(code, tmp_path):
    """Run `code` in a fresh Python where `import da2ext` fails (what a deployment has)."""
    script = "import sys\nsys.modules['da2ext'] = None  # not installed\n" + code
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_onnx_file_runs_without_da2ext_with_the_same_logits(learned, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported file (pip install onnxruntime)")
    model, data, _ = learned
    path = str(tmp_path / "shapes.onnx")
    metadata = export_domain(model, "shapes", path, "onnx")
    proto = onnx.load(path)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node), \
        sorted(set(node.domain for node in proto.graph.node))
    # The late branches' 1 x 1 outputs are added by broadcasting, and no memory-order hook is
    # exported: no resize and no shape arithmetic in the graph (each a runtime node).
    ops = set(node.op_type for node in proto.graph.node)
    assert not ops & {"Resize", "Shape", "Gather", "Range"}, sorted(ops)
    assert json.loads(dict((p.key, p.value) for p in proto.metadata_props)["da2ext"]) == metadata
    record = model.domain_info("shapes")["preprocessing"]
    inputs = torch.stack([image_tensor(i, record) for i in val_images(data)[1]])
    torch.save({"inputs": inputs}, str(tmp_path / "inputs.pt"))
    out = _standalone(
        "import json, numpy, onnxruntime, torch\n"
        "inputs = torch.load('inputs.pt')['inputs'].numpy()\n"
        "session = onnxruntime.InferenceSession('shapes.onnx', providers=['CPUExecutionProvider'])\n"
        "meta = json.loads(session.get_modelmeta().custom_metadata_map['da2ext'])\n"
        "rows = [session.run(['logits'], {'images': inputs[i:i + n]})[0] for i, n in ((0, 1), (1, 5), (6, 6))]\n"
        "numpy.save('logits.npy', numpy.concatenate(rows))\n"
        "print(meta['class_names'])\n", tmp_path)
    assert "circle" in out
    import numpy as np
    logits = torch.from_numpy(np.load(str(tmp_path / "logits.npy")))
    assert (logits - reference_logits(model, inputs)).abs().max().item() < 1e-4


def test_torchscript_file_runs_without_da2ext_with_the_same_logits(learned, tmp_path):
    model, data, _ = learned
    path = str(tmp_path / "shapes.pt")
    export_domain(model, "shapes", path, "torchscript")
    record = model.domain_info("shapes")["preprocessing"]
    inputs = torch.stack([image_tensor(i, record) for i in val_images(data)[1]])
    torch.save({"inputs": inputs}, str(tmp_path / "inputs.pt"))
    _standalone(
        "import json, torch\n"
        "files = {'da2ext.json': ''}\n"
        "module = torch.jit.load('shapes.pt', _extra_files=files)\n"
        "assert json.loads(files['da2ext.json'])['domain'] == 'shapes'\n"
        "inputs = torch.load('inputs.pt')['inputs']\n"
        "torch.save({'logits': torch.cat([module(inputs[:1]), module(inputs[1:])])}, 'logits.pt')\n", tmp_path)
    logits = torch.load(str(tmp_path / "logits.pt"))["logits"]
    assert (logits - reference_logits(model, inputs)).abs().max().item() < 1e-4


def test_fp16_onnx_file_holds_float16(learned, tmp_path):
    onnx = pytest.importorskip("onnx")
    model, _, _ = learned
    path = str(tmp_path / "shapes16.onnx")
    export_domain(model, "shapes", path, "onnx", torch.float16)
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert os.path.getsize(path) < 0.6 * len(export_to_bytes(model, tmp_path))


def export_to_bytes(model, tmp_path):
    path = str(tmp_path / "shapes32.onnx")
    export_domain(model, "shapes", path, "onnx")
    with open(path, "rb") as f:
        return f.read()


def test_export_command_writes_the_file_and_says_what_it_holds(learned, capsys, tmp_path):
    _, _, runs = learned
    out_path = str(tmp_path / "shapes.pt")
    status, out, err = run_cli(["export", "--workdir", runs, "--domain", "shapes", "--format", "torchscript",
                                out_path] + MODEL_ARGS, capsys)
    assert status == 0, err
    assert os.path.isfile(out_path) and "4 classes" in out and "[N, 3, 32, 32]" in out
    status, _, err = run_cli(["export", "--workdir", runs, "--domain", "shapes", str(tmp_path / "no" / "x.onnx")]
                             + MODEL_ARGS, capsys)
    assert status == 2 and "no such directory" in err


def test_export_refuses_what_it_cannot_write(learned, tmp_path):
    model, _, _ = learned
    with pytest.raises(ValueError, match="format"):
        export_domain(model, "shapes", str(tmp_path / "x"), "tflite")
    with pytest.raises(ValueError, match="dtype"):
        export_domain(model, "shapes", str(tmp_path / "x"), "onnx", torch.float64)
    assert not os.path.exists(str(tmp_path / "x"))


def test_an_export_that_fails_leaves_the_earlier_file_as_it_was(learned, tmp_path, monkeypatch):
    model, _, _ = learned
    path = str(tmp_path / "shapes.pt")
    export_domain(model, "shapes", path, "torchscript")
    with open(path, "rb") as f:
        before = f.read()
    export_module = sys.modules["da2ext.deploy.export"]

    def broken(network, example, metadata):
        raise RuntimeError("the exporter failed half-way")

    monkeypatch.setattr(export_module, "_torchscript_bytes", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        export_domain(model, "shapes", path, "torchscript")
    with open(path, "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(str(tmp_path))) == ["shapes.pt"]  # no partial file left either
