"""Example models config: ``python app.py --config examples/my_models.py``.

The app runs this file with these names defined (no import needed):

* ``register(name, loader, preprocessing, labels, cam_layer=None, label="", description="",
  check=None, default=False)`` adds a model. ``loader()`` returns an ``nn.Module``; it runs on
  first use, not at startup. ``preprocessing`` is a ``Preprocessing`` (or a dict of its fields):
  resize the shorter side, centre-crop, then normalise with mean/std. ``labels`` is a list of
  class names or the path of a file with one per line. ``check()`` returns None when the model
  can load, else the reason shown in the model list (keep it instant).
* ``Preprocessing(resize, crop, mean, std, interpolation="bilinear")``
* ``state_dict_loader(build, path)`` – builds an architecture and loads a state dict with
  ``torch.load(path, weights_only=True)`` (no arbitrary pickles).
* ``torchscript_loader(path)`` – ``torch.jit.load(path)``.
* ``read_labels(path)``, ``imagenet_labels()``, ``IMAGENET_MEAN``, ``IMAGENET_STD``.

Weights are read only from the paths written here by the operator.
"""
import os

import torch
import torchvision
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))

# 1. A torchvision architecture with your own fine-tuned weights (a state dict).
#    Point MY_RESNET18_WEIGHTS at the file; until it exists the model is listed as unavailable.
WEIGHTS = os.environ.get("MY_RESNET18_WEIGHTS", os.path.join(HERE, "my_resnet18.pt"))

register(  # noqa: F821
    "my_resnet18",
    state_dict_loader(lambda: torchvision.models.resnet18(weights=None), WEIGHTS),  # noqa: F821
    Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),  # noqa: F821
    imagenet_labels(),  # noqa: F821
    cam_layer="layer4",
    label="My ResNet-18",
    check=lambda: None if os.path.isfile(WEIGHTS) else f"weights file {WEIGHTS} does not exist",
)


# 2. A small model defined right here (random weights: a stand-in to try the app with).
class TwoLayer(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


def build_demo() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return TwoLayer()


register(  # noqa: F821
    "demo_shapes",
    build_demo,
    {"resize": 72, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
    ["circle", "square", "triangle"],
    cam_layer="features.3",
    label="Demo (random weights)",
)
