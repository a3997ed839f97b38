"""Captum Insights' ``AttributionVisualizer`` on this dashboard: port a script by changing one import.

    # from captum.insights import AttributionVisualizer, Batch
    # from captum.insights.attr_vis.features import ImageFeature
    from insights.captum_compat import AttributionVisualizer, Batch, ImageFeature

The constructor and ``serve``/``render`` take Captum Insights' arguments (written from its public
signatures and docstrings; Captum is never imported). What each one becomes here:

- ``models``: each is a registered model (``model``, or ``model1``, ``model2``, … for several), all
  with ``classes`` as labels; the dashboard explains a copy of each, made by the constructor.
- ``features``: one :class:`ImageFeature`. Its ``input_transforms`` turn a batch's tensor into the
  model's input: Normalize (or nothing) becomes the model's exact preprocessing; any other callables
  run as they are on the 1×C×H×W tensor of the image. ``baseline_transforms`` are not applied:
  the dashboard's methods take their baseline from their ``baselines`` parameter, zeros of the
  model's input by default, which is what Captum's tutorial ``input * 0`` gives; the constructor
  tries the first one on the first image and warns, with what to set, when it gives anything else.
  ``visualization_transform`` is not used either: the dashboard shows each batch tensor as the
  image (values in 0–1, before ``input_transforms``). :class:`TextFeature` and
  :class:`GeneralFeature` are refused with a message naming what is supported.
- ``dataset``: an iterable of :class:`Batch`, read once by the constructor, at most ``max_items``
  images (the rest is left unread, with a warning): the dashboard's dataset view lists them with
  their true labels. ``additional_args`` are refused (the models get one image tensor).
- ``score_func``: the dashboard's probabilities are the softmax of the model's outputs; a
  ``score_func`` that gives other values is accepted with a warning saying so.
- ``use_label_for_attr``: True (Captum's default) matches the dashboard: an item is explained for
  its true label unless you pick another class. False is accepted only for models with one output
  per class (as every model here must have); the target is then the class you pick.
- ``serve(blocking, debug, port, bind_all)``: starts the dashboard (insights.notebook) and returns
  its port. ``debug`` is accepted and never turns on Flask's debugger (it would let any page that
  reaches the server run code). ``bind_all=True`` listens on every address, and then needs an
  access token: ``token=`` or, when none is given, a new random one, printed with the address.
- ``render()``: serves (if not serving) and shows the dashboard in the notebook's output.
"""
from __future__ import annotations

import secrets
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

MAX_ITEMS = 1000  # images the constructor reads from the dataset by default
SUPPORTED = ("ImageFeature: image classifiers whose input is one N×C×H×W image tensor, with values in 0–1 "
             "(or uint8) before input_transforms")


class Batch:
    """A batch of examples: ``inputs`` (an N×C×H×W tensor, or a tuple holding one), ``labels``
    (a 1-D tensor of N class indices, or None) and ``additional_args`` (refused here: the models
    are called with the image tensor alone)."""

    def __init__(self, inputs, labels, additional_args=None):
        self.inputs = inputs
        self.labels = labels
        self.additional_args = additional_args


def _as_list(transforms) -> list[Callable]:
    if transforms is None:
        return []
    items = list(transforms) if isinstance(transforms, (list, tuple)) else [transforms]
    for t in items:
        if not callable(t):
            raise TypeError(f"a transform must be callable, got {type(t).__name__}")
    return items


class BaseFeature:
    """A model input as Captum Insights described it (name and transforms)."""

    kind = "feature"

    def __init__(self, name: str, baseline_transforms=None, input_transforms=None, visualization_transform=None):
        self.name = name
        self.baseline_transforms = _as_list(baseline_transforms)
        self.input_transforms = _as_list(input_transforms)
        if visualization_transform is not None and not callable(visualization_transform):
            raise TypeError("visualization_transform must be callable")
        self.visualization_transform = visualization_transform


class ImageFeature(BaseFeature):
    """An image input: ``input_transforms`` (e.g. Normalize) make the model's input from the batch
    tensor; ``baseline_transforms`` and ``visualization_transform`` are accepted (see the module's
    description for what the dashboard does instead)."""

    kind = "image"

    def __init__(self, name: str, baseline_transforms, input_transforms, visualization_transform=None):
        super().__init__(name, baseline_transforms, input_transforms, visualization_transform)


class TextFeature(BaseFeature):
    """A text input: importable so that scripts load, refused by :class:`AttributionVisualizer`."""

    kind = "text"

    def __init__(self, name: str, baseline_transforms, input_transforms, visualization_transform):
        super().__init__(name, baseline_transforms, input_transforms, visualization_transform)


class GeneralFeature(BaseFeature):
    """A tabular input (N×C with category names): importable, refused by :class:`AttributionVisualizer`."""

    kind = "general"

    def __init__(self, name: str, categories: list[str]):
        super().__init__(name)
        self.categories = list(categories)


def _refusal(features: Sequence) -> str | None:
    """Why these features cannot be served (None when they can)."""
    if len(features) != 1 or not isinstance(features[0], ImageFeature):
        given = ", ".join(f"{type(f).__name__}({getattr(f, 'name', '')!r})" for f in features) or "none"
        return (f"insights.captum_compat serves image classifiers only: features must be one {SUPPORTED}. "
                f"Got {given}; text (TextFeature) and tabular (GeneralFeature) features, and models with "
                "several inputs, are not supported.")
    return None


def _normalize_only(transforms: list) -> tuple[tuple, tuple] | None:
    """(mean, std) when ``transforms`` is nothing or one torchvision Normalize; else None."""
    if not transforms:
        return None if transforms is None else ((), ())
    if len(transforms) == 1 and type(transforms[0]).__name__ == "Normalize" \
            and type(transforms[0]).__module__.startswith("torchvision.transforms"):
        t = transforms[0]
        return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return None


class _TensorInput:
    """A model's input made from a PIL image: the image as a 1×C×H×W tensor in 0–1, then the
    feature's input transforms, as Captum applied them to a batch."""

    def __init__(self, transforms: list, channels: int):
        self.transforms, self.channels = transforms, channels

    def __call__(self, img):
        from torchvision.transforms.functional import to_tensor

        x = to_tensor(img.convert("RGB"))[: self.channels].unsqueeze(0)
        for t in self.transforms:
            x = t(x)
        return x


class AttributionVisualizer:
    """Captum Insights' visualizer, served by this dashboard. ``max_items`` (not Captum's): how
    many images to read from ``dataset`` (an endless iterator is cut there)."""

    def __init__(self, models, classes: list[str], features, dataset: Iterable[Batch],
                 score_func: Callable | None = None, use_label_for_attr: bool = True, *,
                 max_items: int = MAX_ITEMS):
        from torch import nn

        self.models = list(models) if isinstance(models, (list, tuple)) else [models]
        if not self.models or not all(isinstance(m, nn.Module) for m in self.models):
            raise TypeError("models must be a torch.nn.Module or a list of them")
        self.classes = [str(c) for c in classes]
        if not self.classes:
            raise ValueError("classes must name at least one class")
        self.features = list(features) if isinstance(features, (list, tuple)) else [features]
        why = _refusal(self.features)
        if why:
            raise ValueError(why)
        self.feature: ImageFeature = self.features[0]
        if score_func is not None and not callable(score_func):
            raise TypeError("score_func must be callable (e.g. a softmax over dimension 1)")
        self.score_func = score_func
        self.use_label_for_attr = bool(use_label_for_attr)
        self.items = self._read(dataset, int(max_items))
        self._check_models()
        self._dashboard = None

    # -- reading the dataset ----------------------------------------------------------------

    def _read(self, dataset: Iterable[Batch], max_items: int) -> list[tuple[Any, int | None]]:
        """(image tensor, label) pairs from the batches, at most ``max_items``."""
        import torch

        items: list[tuple[Any, int | None]] = []
        batches = iter(dataset)
        while len(items) < max_items:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError as err:  # a generator that let a StopIteration out (PEP 479): its end
                if isinstance(err.__cause__, StopIteration):
                    break
                raise
            inputs = batch.inputs if isinstance(batch, Batch) else None
            if inputs is None:
                raise TypeError(f"the dataset must yield Batch objects, got {type(batch).__name__}")
            if batch.additional_args is not None:
                raise ValueError("Batch.additional_args are not supported: the dashboard calls each model with "
                                 "the image tensor alone")
            if isinstance(inputs, (list, tuple)):
                if len(inputs) != 1:
                    raise ValueError(f"a Batch holds {len(inputs)} input tensors; insights.captum_compat serves "
                                     f"models with one: {SUPPORTED}")
                inputs = inputs[0]
            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
                raise ValueError(f"Batch.inputs must be an N×C×H×W image tensor, got "
                                 f"{tuple(getattr(inputs, 'shape', ())) or type(inputs).__name__}")
            if inputs.is_floating_point() and inputs.numel():
                low, high = float(inputs.min()), float(inputs.max())
                if low < -1e-6 or high > 1 + 1e-6:
                    raise ValueError(f"Batch.inputs hold values from {low:.3g} to {high:.3g}; the dashboard shows "
                                     "each input as an image, so they must lie in 0–1 (or be uint8). Move the "
                                     "normalisation into ImageFeature's input_transforms, as Captum's CIFAR "
                                     "tutorial does")
            labels = batch.labels
            n = inputs.shape[0]
            if labels is not None and (not hasattr(labels, "__len__") or len(labels) != n):
                raise ValueError(f"Batch.labels must hold one label per input ({n})")
            for i in range(n):
                if len(items) == max_items:
                    break
                label = None if labels is None else int(labels[i])
                items.append((inputs[i].detach().cpu(), label))
        else:
            warnings.warn(f"AttributionVisualizer read the first {max_items} images of the dataset and left the "
                          "rest (max_items= reads more)", stacklevel=3)
        if not items:
            raise ValueError("the dataset yielded no images")
        shapes = {tuple(x.shape) for x, _ in items}
        if len(shapes) != 1:
            raise ValueError(f"the dataset's images differ in shape ({', '.join(map(str, sorted(shapes)))}); "
                             "the dashboard needs one input shape per model")
        return items

    # -- the models' input ----------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.items[0][0].shape)

    def input_spec(self):
        """(preprocessing, custom transform) for the models: Normalize (or nothing) on square
        images is the exact preprocessing; anything else runs through :class:`_TensorInput`."""
        from .models import Preprocessing

        channels, height, width = self.input_shape
        norm = _normalize_only(self.feature.input_transforms)
        side = min(height, width)
        if norm is not None and height == width and channels in (1, 3):
            mean, std = norm if norm[0] else ((0.0,) * channels, (1.0,) * channels)
            if len(mean) == channels:
                return Preprocessing(resize=side, crop=side, mean=mean, std=std), None
        shape = Preprocessing(resize=max(height, width), crop=side, mean=(0.0,) * channels, std=(1.0,) * channels)
        return shape, _TensorInput(self.feature.input_transforms, channels)

    def _check_models(self) -> None:
        """Runs each model on the first image: it must give one score per class; a score_func
        other than a softmax gets a warning (the dashboard shows softmax probabilities)."""
        import torch

        x = self.items[0][0].unsqueeze(0)
        x = x.float() / 255 if not x.is_floating_point() else x
        for t in self.feature.input_transforms:
            x = t(x)
        self._check_baselines(x)
        warned = False
        for i, model in enumerate(self.models):
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            modes = [(m, m.training) for m in model.modules()]  # run in eval mode: no batch-norm updates
            model.eval()
            try:
                with torch.no_grad():
                    out = model(x.to(device))
            finally:
                for m, training in modes:
                    m.training = training
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, len(self.classes)):
                raise ValueError(f"model {i} gives {tuple(getattr(out, 'shape', ())) or type(out).__name__} for one "
                                 f"image; the dashboard needs one score per class (1×{len(self.classes)})")
            if self.score_func is not None:
                scores = self.score_func(out)
                same = isinstance(scores, torch.Tensor) and scores.shape == out.shape and \
                    torch.allclose(scores.float(), torch.softmax(out.float(), dim=1), atol=1e-5)
                if not same and not warned:
                    warnings.warn("score_func does not give the softmax of the model's outputs; the dashboard's "
                                  "probabilities are the softmax, and score_func is not used", stacklevel=3)
                    warned = True  # once; every model's outputs are still checked

    def _check_baselines(self, x) -> None:
        """Captum applied a baseline transform to the model's input; the dashboard's methods use
        their ``baselines`` parameter (0 by default). A transform that gives zeros (the tutorial's
        ``input * 0``) is what they do already; for any other, a warning says what to set."""
        import torch

        for t in self.feature.baseline_transforms[:1]:  # Captum used the first one only
            b = t(x)
            if isinstance(b, torch.Tensor) and b.shape == x.shape and not bool(b.any()):
                continue
            if isinstance(b, torch.Tensor) and b.numel() and bool((b == b.flatten()[0]).all()):
                advice = f"set the method's baselines parameter to {float(b.flatten()[0]):g} for the same baseline"
            else:
                advice = "this baseline is not a constant image, so set it from Python (insights.attribute(..., " \
                         "baselines=tensor)) to use it"
            warnings.warn(f"baseline_transforms are not applied by the dashboard: its methods take their baseline "
                          f"from their baselines parameter (0 by default); {advice}", stacklevel=4)

    # -- serving ------------------------------------------------------------------------------

    def _entries(self) -> list:
        from .notebook import ModelEntry, snapshot

        preprocessing, custom = self.input_spec()
        several = len(self.models) > 1
        entries = []
        for i, model in enumerate(self.models):
            name = f"model{i + 1}" if several else "model"
            entries.append(ModelEntry(name, snapshot(model), preprocessing, custom,
                                      label=f"{type(model).__name__} ({name})",
                                      description=f"model {i} of the AttributionVisualizer"))
        return entries

    def serve(self, blocking: bool = False, debug: bool = False, port=None, bind_all: bool = False, *,
              token: str | None = None) -> int:
        """Starts the dashboard (stopping one this visualizer started before) and returns its port.
        ``blocking``: serve until Ctrl+C. ``bind_all``: listen on every address, with an access
        token (``token``, or a new one printed with the address)."""
        from .datasets import from_python
        from .notebook import serve

        self.stop()
        settings = {}
        host = "127.0.0.1"
        if bind_all:
            host = "0.0.0.0"
            token = token or secrets.token_urlsafe(24)
            settings["TOKENS"] = [token]
        elif token:
            settings["TOKENS"] = [token]
        data = from_python("dataset", self.items, self.classes)
        first = next((p.device for p in self.models[0].parameters()), "cpu")
        self._dashboard = serve(self._entries(), self.classes, [data], port=port, host=host, device=first,
                                settings=settings)
        port = self._dashboard.port
        if bind_all:
            print(f"Insights is serving on every address, port {port} (this machine: {self._dashboard.url}). "
                  f"Other machines need the access token {token}: sign in at /signin, or send "
                  f"Authorization: Bearer {token}. The connection is plain HTTP: use it on networks you trust.",
                  flush=True)
        else:
            print(f"Insights dashboard: {self._dashboard.url}", flush=True)
        if blocking:
            try:
                while self._dashboard is not None and self._dashboard._thread.is_alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            finally:
                self.stop()
        return port

    def render(self, debug: bool = False) -> None:
        """Shows the dashboard in the notebook's output, serving it first if it is not running."""
        from IPython.display import display

        if self._dashboard is None:
            self.serve(debug=debug)
        display(self._dashboard)

    @property
    def url(self) -> str | None:
        """The running dashboard's address on this machine (None when not serving)."""
        return self._dashboard.url if self._dashboard is not None else None

    def stop(self) -> None:
        """Stops the dashboard this visualizer serves (nothing when none)."""
        if self._dashboard is not None:
            dashboard, self._dashboard = self._dashboard, None
            dashboard.stop()

    def __enter__(self) -> "AttributionVisualizer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["AttributionVisualizer", "Batch", "ImageFeature", "TextFeature", "GeneralFeature", "BaseFeature"]
