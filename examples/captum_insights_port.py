"""A Captum Insights script ported to Insights by changing one import.

Written against Captum Insights' documented API, in the shape of its CIFAR tutorial: a small
LeNet-style network, class names, an ``ImageFeature`` with a Normalize input transform and a
baseline transform, a dataset of ``Batch`` objects, and ``serve``. Only the import differs. It
needs no download: the four classes are scikit-image's sample photos, and the network learns to
tell 32×32 crops of them apart in a few seconds.

    python examples/captum_insights_port.py [--port 8000]    # serves until Ctrl+C
"""
import argparse

import numpy as np
import skimage.data
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF

# Captum Insights:
#   from captum.insights import AttributionVisualizer, Batch
#   from captum.insights.attr_vis.features import ImageFeature
from insights.captum_compat import AttributionVisualizer, Batch, ImageFeature

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SIDE = 32


def get_classes():
    return ["Cat", "Coffee", "Astronaut", "Rocket"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, len(get_classes()))
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = x.flatten(1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


def photos():
    """Each class's photo as a 3×H×W tensor in 0–1, its shorter side 96 pixels (crops of it are cheap)."""
    return [TF.resize(TF.to_tensor(np.asarray(getattr(skimage.data, name)())), 96, antialias=True).clamp(0, 1)
            for name in PHOTOS]


def crops(images, n, generator, scale=(0.45, 1.0)):
    """``n`` random square crops of the ``photos()``, resized to 32×32 (in 0–1), and their classes."""
    out, labels = [], []
    for _ in range(n):
        label = int(torch.randint(len(images), (1,), generator=generator))
        img = images[label]
        h, w = img.shape[1:]
        s = float(torch.empty(1).uniform_(*scale, generator=generator))
        side = max(8, int(min(h, w) * s))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        out.append(TF.resized_crop(img, top, left, side, side, [SIDE, SIDE], antialias=True))
        labels.append(label)
    return torch.stack(out).clamp(0, 1), torch.tensor(labels)


def get_pretrained_model(normalize, steps=120):
    """The network trained on random crops (seeded: the same weights every run)."""
    generator = torch.Generator().manual_seed(0)
    images = photos()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        batch, labels = crops(images, 32, generator)
        loss = F.cross_entropy(net(normalize(batch)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def baseline_func(input):
    return input * 0


def formatted_data_iter(batches=8, batch_size=4):
    """Held-out crops (another seed) in batches of four, as Captum's tutorial fed CIFAR's test set."""
    generator = torch.Generator().manual_seed(1)
    images = photos()
    for _ in range(batches):
        batch, labels = crops(images, batch_size, generator)
        yield Batch(inputs=batch, labels=labels)


def build_visualizer():
    normalize = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = get_pretrained_model(normalize)
    return AttributionVisualizer(
        models=[model],
        score_func=lambda o: torch.nn.functional.softmax(o, 1),
        classes=get_classes(),
        features=[
            ImageFeature(
                "Photo",
                baseline_transforms=[baseline_func],
                input_transforms=[normalize],
            )
        ],
        dataset=formatted_data_iter(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    visualizer = build_visualizer()
    visualizer.serve(blocking=True, port=args.port)


if __name__ == "__main__":
    main()
