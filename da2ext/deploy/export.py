"""One learned domain as a file other runtimes run: ONNX (ONNX Runtime, TensorRT's
trtexec on a Jetson) or TorchScript (libtorch, torch.jit.load).

The model written is inference_model()'s: standard ops only, so stock runtimes
take it without da2ext; the batch axis is dynamic; the input is "images"
(N x 3 x S x S, prepared as the domain records) and the output "logits"
(N x classes). The file describes itself: a JSON record (the domain's name,
class names, preprocessing, method, backbone fingerprint, dtype) in the ONNX
model's metadata_props under "da2ext", or in the TorchScript archive as the
extra file "da2ext.json". Files are written atomically, as domain files are.

ONNX goes through torch.export (torch.onnx.export(dynamo=True), which needs the
onnx and onnxscript packages) where the installed torch has it, and through the
TorchScript-based exporter on older torch (the Jetson's 1.10).
"""
import io
import json

import torch

from ..domains.atomic_file import atomic_write
from .inference_model import inference_model

__all__ = ["FORMATS", "METADATA_KEY", "export_domain", "export_metadata"]

FORMATS = ("onnx", "torchscript")
METADATA_KEY = "da2ext"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
_ONNX_OPSET = 18           # torch.export-based exporter
_LEGACY_ONNX_OPSET = 13    # the TorchScript-based one (torch 1.10 reaches 13)


def export_metadata(model, domain, dtype):
    """The JSON record a file carries: what a runtime needs to feed it and read it."""
    info = model.domain_info(domain)
    return {"format": "da2ext-exported-domain", "domain": domain, "method": model.method.name,
            "architecture": model.architecture, "backbone_fingerprint": model.backbone_fingerprint,
            "num_classes": info["num_classes"], "class_names": info["class_names"],
            "preprocessing": info["preprocessing"], "dtype": str(dtype).replace("torch.", ""),
            "input": INPUT_NAME, "output": OUTPUT_NAME}


def _has_torch_export_onnx():
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        return False
    return hasattr(torch, "export") and hasattr(torch.onnx, "ONNXProgram")


def _onnx_bytes(network, example, metadata):
    try:
        import onnx
    except ImportError:
        raise ImportError("exporting to ONNX needs the onnx package: pip install onnx onnxscript")
    if _has_torch_export_onnx():
        program = torch.onnx.export(network, (example,), None, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], opset_version=_ONNX_OPSET, external_data=False,
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(network, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=_LEGACY_ONNX_OPSET, dynamic_axes={INPUT_NAME: {0: "batch"},
                                                                          OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _torchscript_bytes(network, example, metadata):
    with torch.no_grad():
        traced = torch.jit.trace(network, (example,), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={METADATA_KEY + ".json": json.dumps(metadata, sort_keys=True)})
    return buffer.getvalue()


def export_domain(model, domain, path, format="onnx", dtype=torch.float32):
    """Write `domain` of `model` (a MultiDomainModel) to `path` as `format`
    ("onnx" or "torchscript"), computing in `dtype` (torch.float16 halves the
    file, for GPU runtimes). Returns the metadata record written with it."""
    if format not in FORMATS:
        raise ValueError("export: format must be one of {}, got {!r}".format(", ".join(FORMATS), format))
    if dtype not in (torch.float32, torch.float16):
        raise ValueError("export: dtype must be torch.float32 or torch.float16, got {}".format(dtype))
    preprocessing = model.domain_info(domain)["preprocessing"]  # KeyError naming the domains when unknown
    if preprocessing is None:
        raise ValueError("export: domain {!r} records no preprocessing (image size, normalisation): its file "
                         "predates that record; learn it again".format(domain))
    network = inference_model(model, domain, dtype)
    size = preprocessing["image_size"]
    example = torch.zeros(2, 3, size, size, dtype=dtype)  # batch 2: a batch of 1 could be traced as a constant
    metadata = export_metadata(model, domain, dtype)
    data = (_onnx_bytes if format == "onnx" else _torchscript_bytes)(network, example, metadata)
    atomic_write(path, lambda f: f.write(data))
    return metadata
