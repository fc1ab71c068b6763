"""The user's path after the main job: `predict` and `export` on the domains the
digits demo learned, the exported ONNX file giving the same logits as the model
(within 1e-4) on each domain's real validation images.

Runs on the work directory named by DA2EXT_DEMO_WORKDIR (CI sets it to its short
digits-demo run, .ci/run); skipped without it:

    python -m da2ext digits-demo --workdir runs/ci --epochs 1 --subsample 128
    DA2EXT_DEMO_WORKDIR=runs/ci python -m pytest tests/test_demo_deploy.py
"""
import json
import os

import pytest
import torch

from da2ext.data.digits import DOMAINS
from da2ext.data.loaders import load_rgb
from da2ext.deploy.export import INPUT_NAME, OUTPUT_NAME
from da2ext.domains.preprocessing import image_batch
from da2ext.training.workflow import WorkDir, build_model, load_saved_domains
from helpers import run_cli

WORKDIR = os.environ.get("DA2EXT_DEMO_WORKDIR")
pytestmark = pytest.mark.skipif(not WORKDIR, reason="DA2EXT_DEMO_WORKDIR names no digits-demo work directory "
                                                    "(CI sets it after its short demo run)")


def val_dir(domain):
    return os.path.join(WORKDIR, "data", domain, "val")


def val_paths(domain, count=None):
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(val_dir(domain)) for name in names
                   if name.endswith(".png"))
    return paths[:count] if count else paths


@pytest.fixture(scope="module")
def demo_model():
    model = build_model()  # what the demo builds: the ImageNet EfficientNet-Lite0, da2
    names = load_saved_domains(model, WorkDir(WORKDIR))
    assert sorted(names) == sorted(DOMAINS), names
    return model


@pytest.mark.parametrize("domain", DOMAINS)
def test_predict_classifies_every_validation_image(domain, capsys):
    status, out, err = run_cli(["predict", "--workdir", WORKDIR, "--domain", domain, "--json", "--no-progress",
                                "--topk", "3", val_dir(domain)], capsys)
    assert status == 0, err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == val_paths(domain)
    assert all(len(r["predictions"]) == 3 and r["predictions"][0]["class"] in "0123456789" for r in rows)


@pytest.mark.parametrize("domain", DOMAINS)
def test_exported_onnx_gives_the_models_logits(domain, demo_model, capsys, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported file")
    path = str(tmp_path / (domain + ".onnx"))
    status, out, err = run_cli(["export", "--workdir", WORKDIR, "--domain", domain, "--format", "onnx", path],
                               capsys)
    assert status == 0, err
    images = [load_rgb(p) for p in val_paths(domain, 32)]
    inputs = image_batch(images, demo_model.domain_info(domain)["preprocessing"])
    demo_model.eval()
    with demo_model.domain(domain), torch.no_grad():
        expected = demo_model(inputs)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]
    assert (torch.from_numpy(logits) - expected).abs().max().item() < 1e-4
    single = session.run([OUTPUT_NAME], {INPUT_NAME: inputs[:1].numpy()})[0]  # the batch axis is dynamic
    assert (torch.from_numpy(single) - expected[:1]).abs().max().item() < 1e-4
