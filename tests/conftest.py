"""Shared fixtures: small seeded models and inputs for the engine's tests."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn


class SmallCNN(nn.Module):
    """A tiny classifier for 3×64×64 inputs with one module per operation (none re-used):
    Conv2d, BatchNorm2d, an in-place ReLU, MaxPool2d, AdaptiveAvgPool2d and Linear.

    A convolution sits between every two nonlinearities: Captum 0.9's DeepLift mis-handles a
    nonlinearity whose output feeds another hooked nonlinearity directly (its tensor hooks
    see the gradient before the next module's rule rewrites it), so the parity tests use a
    model where Captum is right."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv3(self.pool(self.conv2(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class Gray(nn.Module):
    """A 1-channel 28×28 classifier (MNIST-sized), four classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 7 * 7, 4)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 7).flatten(1))


def seeded(build, seed: int = 0) -> nn.Module:
    """Builds a model with weights drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
        for module in model.modules():  # non-trivial batch-norm statistics and affine terms
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


@pytest.fixture
def small_cnn() -> nn.Module:
    """SmallCNN (10 classes, 3×64×64 input), seeded, in eval mode."""
    return seeded(SmallCNN)


@pytest.fixture
def resnet18() -> nn.Module:
    """torchvision resnet18 with random (seeded) weights, 1000 classes, in eval mode."""
    return seeded(lambda: torchvision.models.resnet18(weights=None))


@pytest.fixture
def images() -> torch.Tensor:
    """Two seeded 3×64×64 inputs in normalised units."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value (the parity measure)."""
    ours, theirs = ours.detach(), theirs.detach()
    return float((ours - theirs).abs().max() / theirs.abs().max())


def logits(model, x, target):
    """Each row's target logit, without a graph."""
    with torch.no_grad():
        return model(x).gather(1, torch.as_tensor(target).view(-1, 1)).squeeze(1)


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that requires grad, as Captum expects (it warns otherwise)."""
    return x.clone().requires_grad_(True)
