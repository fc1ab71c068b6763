"""One learned domain for deployment: a plain inference model (inference_model.py)
and its files for other runtimes (export.py: ONNX, TorchScript). Not imported by
`import da2ext`: `from da2ext import deploy`."""
from .export import export_domain
from .inference_model import FoldedConvAct, InferenceAdaptor, inference_model

__all__ = ["FoldedConvAct", "InferenceAdaptor", "export_domain", "inference_model"]
