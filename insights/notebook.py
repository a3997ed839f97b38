"""The dashboard from a notebook: ``insights.show(model, labels, dataset, transform)``.

``show`` registers a Python model (and a dataset of Python objects) with a fresh app, serves it
with waitress on a free loopback port from a daemon thread, and returns a :class:`Dashboard` that
displays itself as an IFrame (JupyterLab, classic Notebook, VS Code; Colab through its port
proxy) and stops with ``.stop()`` or at the end of a ``with`` block.

The server listens on 127.0.0.1 only and has no token: only this machine reaches it. It allows the
notebook to frame it (:data:`FRAME_ANCESTORS`). A torchvision transform made of Resize, CenterCrop,
ToTensor and Normalize (or a weights' ``transforms()``) becomes the model's preprocessing exactly,
so maps line up with the image; any other callable runs as it is (see ``ModelSpec.prepare``).
"""
from __future__ import annotations

import atexit
import copy
import functools
import html
import shutil
import socket
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Who may frame the dashboard: a Jupyter server on any localhost port (JupyterLab, Notebook) and VS
# Code's webviews (desktop and the browser build's CDN); in Colab only, Colab's output frames too
# (*.googleusercontent.com serves other people's content as well, so it is not allowed elsewhere).
# frame-ancestors checks every ancestor, so both the output frame and the page around it must be covered.
FRAME_ANCESTORS = ("'self'", "http://localhost:*", "http://127.0.0.1:*", "https://localhost:*",
                   "https://127.0.0.1:*", "vscode-webview:", "vscode-file:", "https://*.vscode-cdn.net")
COLAB_ANCESTORS = ("https://colab.research.google.com", "https://*.googleusercontent.com")
HOST = "127.0.0.1"
THREADS = 8  # more than MAX_INLINE_WAITS + MAX_EVENT_STREAMS (app.py's threads_refusal)
PROBE_SIZE = 224  # the side of the grey image a custom transform is tried on, for its output's shape


@dataclass
class ModelEntry:
    """One model to serve: the module (served as it is), its input preparation, its display name."""

    name: str
    module: Any
    preprocessing: Any  # models.Preprocessing
    transform: Callable | None = None
    label: str = ""
    description: str = ""


# --------------------------------------------------------------------------- transforms


def _steps(transform) -> list:
    """The transforms a Compose (v1 or v2), a list or a single callable is made of."""
    if isinstance(transform, (list, tuple)):
        return [s for t in transform for s in _steps(t)]
    inner = getattr(transform, "transforms", None)
    if type(transform).__name__ == "Compose" and isinstance(inner, (list, tuple)):
        return _steps(list(inner))
    return [transform]


def _kind(step) -> str:
    """The name of a torchvision transform class (v1 or v2), or "" for anything else."""
    module = type(step).__module__ or ""
    return type(step).__name__ if module.startswith("torchvision.transforms") else ""


def _side(size) -> int | None:
    """An int, or a one-element / square two-element size, as one side; else None."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, (list, tuple)) and size and all(isinstance(v, int) for v in size):
        if len(size) == 1 or (len(size) == 2 and size[0] == size[1]):
            return int(size[0])
    return None


def preprocessing_of(transform):
    """The :class:`~insights.models.Preprocessing` that does exactly what ``transform`` does, or
    None when there is none. Recognised: a weights' ``transforms()`` (ImageClassification), and a
    Compose (or list) of Resize(int) [shorter side], CenterCrop(int), ToTensor (or PILToTensor +
    ConvertImageDtype(float), or v2's ToImage + ToDtype(float, scale=True)) and Normalize(mean,
    std) with three channels, in that order; None (no transform) is ImageNet's 256/224."""
    import torch

    from .models import INTERPOLATIONS, Preprocessing

    if transform is None:
        return Preprocessing(resize=256, crop=224)
    if type(transform).__name__ == "ImageClassification" and hasattr(transform, "crop_size"):
        resize, crop = _side(transform.resize_size), _side(transform.crop_size)
        mode = getattr(transform.interpolation, "value", transform.interpolation)
        if resize and crop and crop <= resize and mode in INTERPOLATIONS and transform.antialias is not False:
            return Preprocessing(resize=resize, crop=crop, mean=tuple(transform.mean), std=tuple(transform.std),
                                 interpolation=mode)
        return None
    steps = _steps(transform)
    resize = crop = None
    interpolation = "bilinear"
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    stage = 0  # 0: before the resize, 1: resized, 2: cropped, 3: a float tensor, 4: normalised
    i = 0
    while i < len(steps):
        step, kind = steps[i], _kind(steps[i])
        if kind == "Resize" and stage == 0:
            resize = _side(step.size) if isinstance(step.size, int) or len(step.size) == 1 else None
            mode = getattr(step.interpolation, "value", step.interpolation)
            if resize is None or step.max_size is not None or mode not in INTERPOLATIONS \
                    or step.antialias is False:
                return None
            interpolation, stage = mode, 1
        elif kind == "CenterCrop" and stage == 1:
            crop = _side(step.size)
            if crop is None or crop > resize:
                return None
            stage = 2
        elif kind == "ToTensor" and stage == 2:
            stage = 3
        elif kind in ("PILToTensor", "ToImage") and stage == 2 and i + 1 < len(steps):
            after = steps[i + 1]
            scaled = _kind(after) == "ConvertImageDtype" or getattr(after, "scale", False)
            if _kind(after) not in ("ConvertImageDtype", "ToDtype") or not scaled \
                    or getattr(after, "dtype", None) not in (torch.float32, torch.float):
                return None
            i, stage = i + 1, 3
        elif kind == "Normalize" and stage == 3:
            mean, std = tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
            if len(mean) != 3 or len(std) != 3:
                return None
            stage = 4
        else:
            return None
        i += 1
    if stage < 3:
        return None
    return Preprocessing(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)


def input_of(transform) -> tuple[Any, Callable | None]:
    """(preprocessing, custom transform) for a model's ``transform``: the exact preprocessing and
    no custom step where :func:`preprocessing_of` finds one; else the callable itself, with a
    preprocessing that only tells the shape of its output on a grey PROBE_SIZE² image."""
    from PIL import Image

    from .models import Preprocessing

    exact = preprocessing_of(transform)
    if exact is not None:
        return exact, None
    if not callable(transform):
        raise TypeError(f"transform must be a callable from a PIL image to a tensor, got {type(transform).__name__}")
    x = transform(Image.new("RGB", (PROBE_SIZE, PROBE_SIZE), (128, 128, 128)))
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"transform must turn a PIL image into a C×H×W tensor; it returned "
                         f"{type(x).__name__} of shape {shape}")
    channels, height, width = (int(v) for v in shape)
    return Preprocessing(resize=max(height, width), crop=min(height, width), mean=(0.0,) * channels,
                         std=(1.0,) * channels), transform


# --------------------------------------------------------------------------- display


def in_colab() -> bool:
    return "google.colab" in sys.modules


def frame_ancestors() -> tuple[str, ...]:
    """The frame-ancestors sources of a notebook's server: Colab's only in Colab."""
    return FRAME_ANCESTORS + (COLAB_ANCESTORS if in_colab() else ())


class Dashboard:
    """A running dashboard: ``url``, ``port``, ``app``; ``stop()`` (or leaving a ``with`` block)
    ends the server, its threads and its temporary instance folder. Displayed in a notebook, it
    is the dashboard in an IFrame ``height`` pixels high, with its address."""

    def __init__(self, app, server, thread: threading.Thread, height: int = 720, temp_dir: str | None = None):
        self.app, self._server, self._thread = app, server, thread
        self.port = int(server.effective_port)
        self.host = HOST
        self.url = f"http://{HOST}:{self.port}/"
        self.height = int(height)
        self._lock = threading.Lock()
        self.running = True
        # A kernel that ends without stop() still removes the temporary instance folder.
        self._cleanup = functools.partial(shutil.rmtree, temp_dir, True) if temp_dir else None
        if self._cleanup:
            atexit.register(self._cleanup)

    # -- lifetime -------------------------------------------------------------------------

    def stop(self) -> None:
        """Closes the server's socket and connections from inside its loop, waits for its thread,
        stops the job runner and removes a temporary instance folder. A second call does nothing."""
        with self._lock:
            if not self.running:
                return
            self.running = False
        server = self._server

        def close_all() -> None:
            for channel in list(server._map.values()):
                channel.close()

        server.trigger.pull_trigger(close_all)
        self._thread.join(timeout=30)
        server.task_dispatcher.shutdown()
        service = self.app.extensions["insights"]
        service.dataset_work.shutdown()  # before the runner: a dataset's run submits chunk jobs to it
        service.jobs.shutdown()
        service.store.close()
        if self._cleanup:
            atexit.unregister(self._cleanup)
            self._cleanup()

    def __enter__(self) -> "Dashboard":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- display ----------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "serving" if self.running else "stopped"
        return f"Insights dashboard at {self.url} ({state})"

    def _repr_html_(self) -> str:
        url = html.escape(self.url, quote=True)
        if not self.running:
            return f"<p>Insights dashboard at {url} (stopped)</p>"
        return (f'<iframe src="{url}" width="100%" height="{self.height}" style="border:0" '
                f'title="Insights dashboard"></iframe>'
                f'<p>Insights dashboard: <a href="{url}" target="_blank" rel="noopener">{url}</a></p>')

    def _ipython_display_(self) -> None:
        """In Colab, the frame goes through Colab's port proxy (the kernel's localhost is not the
        browser's); elsewhere the browser reaches 127.0.0.1 itself (VS Code forwards the port when
        the kernel is remote)."""
        from IPython.display import display

        if in_colab() and self.running:
            from google.colab import output
            from google.colab.output import eval_js

            proxied = eval_js(f"google.colab.kernel.proxyPort({self.port})")
            output.serve_kernel_port_as_iframe(self.port, path="/", height=self.height)
            print(f"Insights dashboard: {proxied}")
            return
        display({"text/html": self._repr_html_(), "text/plain": repr(self)}, raw=True)


# --------------------------------------------------------------------------- serving


def serve(models: Sequence[ModelEntry], labels: Sequence[str], datasets: Sequence = (), *, port: int | None = None,
          host: str = HOST, height: int = 720, instance: str | None = None, device=None,
          settings: dict | None = None) -> Dashboard:
    """Builds an app holding ``models`` (the first is the default), all with ``labels``, and the
    ``datasets`` (from :func:`insights.datasets.from_python`), and serves it from a daemon thread
    on ``host`` and ``port`` (None or 0: a free one). ``settings`` are further app settings."""
    from waitress import create_server

    from . import create_app

    labels = [str(v) for v in labels]

    def register_all(register) -> None:
        for i, entry in enumerate(models):
            module = entry.module
            register(entry.name, lambda module=module: module, entry.preprocessing, labels,
                     label=entry.label or entry.name, description=entry.description, default=i == 0,
                     transform=entry.transform)

    # The socket first: a port in use is refused before anything starts (waitress starts its
    # worker threads before binding, and would leave them running).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port or 0)))
    except OSError:
        sock.close()
        raise
    temp_dir = None
    if instance is None:
        instance = temp_dir = tempfile.mkdtemp(prefix="insights-notebook-")
    config = {"INSTANCE_PATH": instance, "BUILTIN_MODELS": False, "MODELS_CONFIG": [register_all],
              "FRAME_ANCESTORS": " ".join(frame_ancestors()), "DEVICE": str(device) if device is not None else "auto",
              **(settings or {})}
    app = None
    try:
        app = create_app(config)
        service = app.extensions["insights"]
        for dataset in datasets:
            service.datasets.add(dataset)
        # poll(), not select(): a kernel that has opened many files may give the socket a
        # descriptor above select()'s limit of 1024, and select() then fails on every loop.
        server = create_server(app, sockets=[sock], threads=THREADS, asyncore_use_poll=True,
                               max_request_body_size=int(app.config["MAX_CONTENT_LENGTH"]))
    except BaseException:
        sock.close()
        if app is not None:
            app.extensions["insights"].jobs.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    thread = threading.Thread(target=server.run, name=f"insights-{server.effective_port}", daemon=True)
    thread.start()
    return Dashboard(app, server, thread, height=height, temp_dir=temp_dir)


def _model_device(module) -> str:
    """The device of the model's first parameter or buffer (cpu when it has none)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return str(tensor.device)
    return "cpu"


def snapshot(module):
    """A copy of the model to serve, so that the app's eval mode and frozen parameters leave the
    notebook's model as it was; the model itself when it cannot be copied (with a warning)."""
    try:
        return copy.deepcopy(module)
    except Exception as err:  # a module holding something deepcopy refuses (a lock, a file)
        warnings.warn(f"insights.show: the model could not be copied ({type(err).__name__}: {err}); the "
                      "dashboard uses it as it is, and puts it in eval mode with its parameters frozen",
                      stacklevel=3)
        return module


def show(model=None, labels: Sequence[str] | None = None, dataset=None, transform=None, *, name: str | None = None,
         port: int | None = None, height: int = 720, instance: str | None = None, device=None) -> Dashboard:
    """Serves the dashboard for ``model`` (an ``nn.Module`` returning one score per label) and
    returns the running :class:`Dashboard`; it shows the dashboard when it is a cell's value.

    ``labels``: the class names, in the model's output order. ``dataset``: a
    ``torch.utils.data.Dataset`` or any iterable of (image, label) — a PIL image, an H×W×C uint8
    array or a C×H×W tensor (0–1 floats or uint8), and a class index, a class name or None —
    listed in the dashboard's dataset view. ``transform``: what turns a PIL image into the model's
    input (torchvision's Resize/CenterCrop/ToTensor/Normalize are used exactly; any other callable
    is applied as it is and the map is laid over the whole image resized to its output); None:
    ImageNet's resize 256, crop 224 and normalisation. ``name``: the model's name (and the
    dataset's, ``<name>-data``). ``port``: None picks a free one. ``instance``: the folder for
    uploads and results (None: a temporary one, removed by ``stop()``). ``device``: where the
    model runs (None: where its parameters are).

    The dashboard explains a copy of the model made now: after training further, call ``show``
    again."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"insights.show needs model=<a torch.nn.Module>, got {type(model).__name__}")
    if labels is None or isinstance(labels, str) or not len(labels):
        raise ValueError("insights.show needs labels=<the class names, a list in the model's output order>")
    name = name or "model"
    preprocessing, custom = input_of(transform)
    module = snapshot(model)
    datasets = []
    if dataset is not None:
        from .datasets import from_python

        datasets.append(from_python(f"{name}-data", dataset, list(labels)))
    entry = ModelEntry(name, module, preprocessing, custom, label=name,
                       description=f"{type(model).__name__} passed to insights.show()")
    dash = serve([entry], labels, datasets, port=port, height=height, instance=instance,
                 device=device if device is not None else _model_device(module))
    print(f"Insights dashboard: {dash.url}", flush=True)
    return dash
