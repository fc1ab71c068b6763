"""One frozen backbone, many domains (docs/design.md §3a): each domain has its own
adaptors, BN shifts and head (whatever its method trains), swapped in by name.

    model = MultiDomainModel(timm.create_model("tf_efficientnet_lite0"))
    model.add_domain("mnist", 10)
    with model.domain("mnist"):
        ...train...
    model.save_domain("mnist", "mnist.safetensors")
    name = other.load_domain("mnist.safetensors")

How: the method (da2 by default) rewrites the backbone once. What the method
trains - its "slots": every trainable parameter, plus the BN statistics of
methods that run BN in train mode (ft) - belongs to the active domain. Each
domain owns its own tensors for every slot, and set_domain puts them into the
model's modules (no copy), so training one domain cannot touch another's
tensors and the frozen backbone is only ever read: earlier domains stay
bit-identical. A new domain starts from the template: the pretrained shifts,
freshly initialised adaptors (gamma 0) and a new head.
"""
import contextlib
import hashlib
from collections import OrderedDict

import torch
from torch import nn

from ..lean.adapt import Head
from ..lean.submodules import owner_of
from ..lean.trainable_tail import TrainableTail
from ..profiling import device_of
from .domain_file import DomainFileError, read_domain_file, write_domain_file
from .prediction import predict_images
from .preprocessing import check_preprocessing

__all__ = ["MultiDomainModel", "weights_fingerprint", "architecture_of"]

FORMAT = "da2ext-domain"
FORMAT_VERSION = 1


def weights_fingerprint(model):
    """sha256 (first 16 hex digits) of every tensor of model.state_dict(): names,
    shapes, dtypes and bytes. Two backbones share it only if they hold the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update("{}:{}:{}|".format(name, tuple(t.shape), t.dtype).encode("utf-8"))
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def architecture_of(model):
    """The class and a hash of the state_dict's names and shapes, e.g.
    "timm.models.efficientnet.EfficientNet/3f2a...": two models share it only if
    their weights would load into each other."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update("{}:{}|".format(name, tuple(tensor.shape)).encode("utf-8"))
    cls = type(model)
    return "{}.{}/{}".format(cls.__module__, cls.__name__, digest.hexdigest()[:12])


class MultiDomainModel(nn.Module):
    """Named domains on one frozen backbone.

    backbone: a model as the user built it (torchvision ResNet/MobileNetV2, timm
        EfficientNet), with its pretrained weights; it is rewritten in place.
    method: the training method whose trainable set makes a domain (da2 by
        default; see da2ext.methods.METHODS).
    """

    def __init__(self, backbone, method="da2"):
        super(MultiDomainModel, self).__init__()
        self.architecture = architecture_of(backbone)
        self.backbone_fingerprint = weights_fingerprint(backbone)
        if isinstance(method, str):
            from .. import methods as methods_registry  # here, so that `import da2ext` loads no method
            method = methods_registry.get(method)
        self.method = method
        self.model = self.method.build(backbone, 1)  # a placeholder head; every domain brings its own
        self.model.train()
        self._head_name = self._find_head()
        self._slots = self._find_slots()
        # The template a new domain starts from: the values right after the rewrite.
        self._template = OrderedDict((name, t.detach().clone()) for name, (_, t) in self._slots.items())
        self._domain_store = nn.ModuleDict()  # registers every domain's tensors (moved by .to())
        self._domain_info = OrderedDict()      # name -> {"num_classes", "class_names", "preprocessing"}
        self._active = None

    # -- what a domain is ------------------------------------------------------------

    def _find_head(self):
        heads = [name for name, m in self.model.named_modules() if isinstance(m, Head)]
        if len(heads) != 1:
            raise RuntimeError("expected one Head in the built model, found {}".format(len(heads)))
        return heads[0]

    def _find_slots(self):
        """name -> ("parameter" or "buffer", tensor) of everything a domain owns."""
        slots = OrderedDict()
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                slots[name] = ("parameter", p)
        statistics = []  # BNs whose running statistics each domain owns
        for module_name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and \
                    module.track_running_stats:
                statistics.append((module_name, module))
            elif isinstance(module, TrainableTail):  # in train mode or not when the model is wrapped
                prefix = module_name + ".module."
                statistics.extend((prefix + name if name else prefix[:-1], bn)
                                  for name, bn in module.domain_statistics())
        for module_name, module in statistics:
            for attr, buf in module.named_buffers(recurse=False):
                slots[module_name + "." + attr] = ("buffer", buf)
        return slots

    def _device(self):
        # The frozen backbone's buffers follow .to(); the template does not need to.
        return device_of(self.model)

    def _head_slot(self, name):
        return name.startswith(self._head_name + ".")

    @property
    def domains(self):
        """The domain names, in the order they were added."""
        return list(self._domain_info)

    @property
    def active_domain(self):
        return self._active

    def domain_info(self, name):
        self._check_known(name)
        return dict(self._domain_info[name])

    def _check_known(self, name):
        if name not in self._domain_info:
            raise KeyError("no domain {!r}; domains: {}".format(name, self.domains))

    def _store_key(self, name):
        return "domain_{}".format(list(self._domain_info).index(name))

    def add_domain(self, name, num_classes, class_names=None, preprocessing=None):
        """A new domain starting from the template, with a new head of `num_classes`.

        preprocessing: how its images are prepared (domains/preprocessing.py's
        record: image size, normalisation), saved in its domain file so that
        predict() and export take PIL images without being told."""
        self._check_new_name(name)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError("add_domain: num_classes must be a positive int, got {!r}".format(num_classes))
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError("add_domain: {} class_names for num_classes={}".format(len(class_names), num_classes))
        problems = check_preprocessing(preprocessing) if preprocessing is not None else []
        if problems:
            raise ValueError("add_domain: " + "; ".join(problems))
        head = self.model.get_submodule(self._head_name)
        new_head = Head(head.in_features, num_classes).to(device=self._device(), dtype=head.weight.dtype)
        tensors = OrderedDict()
        for slot, template in self._template.items():
            if self._head_slot(slot):
                tensors[slot] = getattr(new_head, slot.rpartition(".")[2]).detach().clone()
            else:
                tensors[slot] = template.to(self._device(), copy=True)
        self._register(name, tensors, num_classes, class_names, preprocessing)
        return name

    def _check_new_name(self, name):
        if not isinstance(name, str) or not name:
            raise ValueError("domain name must be a non-empty str, got {!r}".format(name))
        if name in self._domain_info:
            raise ValueError("domain {!r} exists already".format(name))

    def _register(self, name, tensors, num_classes, class_names, preprocessing=None):
        holder = nn.Module()
        for i, (slot, t) in enumerate(tensors.items()):
            kind = self._slots[slot][0]
            if kind == "parameter":
                holder.register_parameter("t{}".format(i), nn.Parameter(t, requires_grad=True))
            else:
                holder.register_buffer("t{}".format(i), t)
        self._domain_info[name] = {"num_classes": num_classes,
                                   "class_names": list(class_names) if class_names is not None else None,
                                   "preprocessing": dict(preprocessing) if preprocessing is not None else None}
        self._domain_store[self._store_key(name)] = holder

    def domain_tensors(self, name):
        """{slot name: tensor} of everything domain `name` owns (the live tensors:
        writing into them changes the domain), in a fixed order."""
        self._check_known(name)
        holder = self._domain_store[self._store_key(name)]
        return OrderedDict((slot, getattr(holder, "t{}".format(i))) for i, slot in enumerate(self._slots))

    def set_domain(self, name):
        """Make `name` the active domain: its tensors go into the model's modules."""
        self._check_known(name)
        for slot, t in self.domain_tensors(name).items():
            # attr names a registered parameter (t is then an nn.Parameter) or buffer of
            # owner: Module.__setattr__ puts t itself in its place, no copy.
            owner, attr = owner_of(self.model, slot)
            setattr(owner, attr, t)
        head = self.model.get_submodule(self._head_name)
        head.out_features = self._domain_info[name]["num_classes"]
        self._active = name

    @contextlib.contextmanager
    def domain(self, name):
        """with model.domain("mnist"): ... - the previous domain comes back afterwards."""
        previous = self._active
        self.set_domain(name)
        try:
            yield self
        finally:
            if previous is not None:
                self.set_domain(previous)

    def trainable_parameters(self):
        """The active domain's parameters (what an optimizer for it takes)."""
        if self._active is None:
            raise RuntimeError("no active domain: call set_domain(name) first")
        return [t for slot, t in self.domain_tensors(self._active).items() if self._slots[slot][0] == "parameter"]

    def param_groups(self, lr_scale=1.0, learning_rates=None):
        """The active domain's parameters grouped with the method's learning rates
        (learning_rates: {group: rate} in place of the method's for those groups)."""
        if self._active is None:
            raise RuntimeError("no active domain: call set_domain(name) first")
        return self.method.param_groups(self.model, lr_scale, learning_rates)

    def predict(self, images, domain=None, topk=5, batch_size=64):
        """The `topk` most probable classes of each image for `domain` (default:
        the active one): a list with, per image, [{"class", "index",
        "probability"}, ...] from the most probable down.

        images: PIL images (one or a list), prepared as the domain's file
        records (image size, normalisation), or a tensor already prepared, N x
        3 x H x W (or 3 x H x W for one image). Runs in eval mode without
        autograd, in batches of `batch_size`; the model's mode and active
        domain are restored afterwards (domains/prediction.py)."""
        return predict_images(self, images, domain, topk, batch_size)

    def forward(self, x):
        if self._active is None:
            raise RuntimeError("no active domain: call add_domain(name, num_classes) and set_domain(name) first")
        return self.model(x)

    # -- files ----------------------------------------------------------------------

    def _metadata(self, name):
        info = self._domain_info[name]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "method": self.method.name,
                "architecture": self.architecture, "backbone_fingerprint": self.backbone_fingerprint,
                "num_classes": info["num_classes"], "class_names": info["class_names"],
                "preprocessing": info["preprocessing"], "slots": list(self._slots)}

    def save_domain(self, name, path, use_safetensors=None):
        """Write domain `name` to `path` atomically (safetensors, or .npz without it)."""
        self._check_known(name)
        write_domain_file(path, self.domain_tensors(name), self._metadata(name), use_safetensors)

    def load_domain(self, path, name=None):
        """Add the domain stored in `path` (under `name`, default: the stored name)
        and return its name. The file is checked completely first - format,
        method, backbone architecture and weights, every tensor's name, shape and
        dtype, finite values - so a damaged or mismatched file raises
        DomainFileError and leaves the model exactly as it was."""
        tensors, meta = read_domain_file(path)
        name = name if name is not None else meta.get("name")
        problems = self._check_file(tensors, meta)
        if problems:
            raise DomainFileError("{} cannot be loaded into this model: {}".format(path, "; ".join(problems)))
        self._check_new_name(name)
        converted = OrderedDict((slot, tensors[slot].to(self._device())) for slot in self._slots)
        self._register(name, converted, int(meta["num_classes"]), meta.get("class_names"), meta.get("preprocessing"))
        return name

    def _check_file(self, tensors, meta):
        expected = {"format": FORMAT, "method": self.method.name, "architecture": self.architecture,
                    "backbone_fingerprint": self.backbone_fingerprint}
        if meta.get("format") != FORMAT:
            return ["not a da2ext domain file (format {!r})".format(meta.get("format"))]
        if meta.get("format_version") != FORMAT_VERSION:
            return ["format version {!r}, this da2ext reads {}".format(meta.get("format_version"), FORMAT_VERSION)]
        problems = ["{} is {!r} in the file, {!r} here".format(key, meta.get(key), value)
                    for key, value in expected.items() if meta.get(key) != value]
        if problems:
            return problems
        num_classes = meta.get("num_classes")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            return ["num_classes {!r} is not a positive int".format(num_classes)]
        class_names = meta.get("class_names")
        if class_names is not None and (not isinstance(class_names, list) or len(class_names) != num_classes or
                                        not all(isinstance(c, str) for c in class_names)):
            return ["class_names {!r} is not a list of num_classes={} strings".format(
                class_names if len(repr(class_names)) < 80 else type(class_names).__name__, num_classes)]
        if meta.get("preprocessing") is not None:  # files of older versions have none
            problems = check_preprocessing(meta["preprocessing"])
            if problems:
                return problems
        if not isinstance(meta.get("name"), str) or not meta["name"]:
            return ["the domain's name {!r} is not a non-empty string".format(meta.get("name"))]
        missing = [s for s in self._slots if s not in tensors]
        extra = [s for s in tensors if s not in self._slots]
        if missing or extra:
            return ["tensors missing: {}; unexpected: {}".format(missing[:5], extra[:5])]
        for slot, (_, reference) in self._slots.items():
            t = tensors[slot]
            shape = tuple(reference.shape)
            if self._head_slot(slot):
                shape = (num_classes,) + shape[1:]
            if tuple(t.shape) != shape or t.dtype != reference.dtype:
                problems.append("{}: {} {} in the file, {} {} expected".format(slot, tuple(t.shape), t.dtype, shape,
                                                                              reference.dtype))
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append("{}: non-finite values".format(slot))
        return problems

    def extra_repr(self):
        return "method={}, domains={}, active={!r}".format(self.method.name, self.domains, self._active)
