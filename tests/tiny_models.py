"""A models config for the web app's tests (loaded like an operator's --config file).

``register`` and ``Preprocessing`` are provided by the app when it runs this file.
"""
import torch
from torch import nn

LABELS = ["apple", "banana", "cherry", "date", "elderberry"]


class Tiny(nn.Module):
    """A random-weight CNN for 3×32×32 inputs with a spatial layer for Grad-CAM."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Tiny()


def broken():
    raise RuntimeError("weights file is corrupt")


register("tiny", tiny, Preprocessing(resize=40, crop=32), LABELS, cam_layer="features.2",  # noqa: F821
         label="Tiny test CNN", default=True)
register("broken", broken, {"resize": 40, "crop": 32}, LABELS)  # noqa: F821
register("missing", tiny, Preprocessing(resize=40, crop=32), LABELS,  # noqa: F821
         check=lambda: "weights /nowhere/missing.pt do not exist")
