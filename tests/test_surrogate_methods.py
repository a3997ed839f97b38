"""Superpixel feature masks, Kernel SHAP, LIME and Shapley value sampling (issue 16): exact
Shapley values equal Captum's ShapleyValues (test-only oracle) when every coalition is scored,
known answers on models whose score is linear in the features, sampling that converges as
samples grow, seeded reproducibility, SLIC masks, feature ablation on superpixels, and errors
that name the parameter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import insights
from insights import ParamError
from insights.engine import EngineOptions
from insights.engine.superpixels import feature_masks, grid_mask

from conftest import logits, rel_error

TARGETS = [3, 7]
SLIC = {"segmentation": "slic", "n_segments": 40, "compactness": 10.0, "slic_sigma": 1.0}


def five_features(side: int = 32) -> torch.Tensor:
    """A 1×1×side×side mask of five regions of different sizes, ids 0..4 (Captum's ShapleyValues
    counts max id + 1 features, and scores all their orders: 5! here)."""
    m = torch.zeros(1, 1, side, side, dtype=torch.long)
    h = side // 2
    m[..., :h, h:] = 1
    m[..., h:, : side // 3] = 2
    m[..., h:, side // 3:] = 3
    m[..., : side // 6, : side // 6] = 4
    return m


@pytest.fixture
def small(images) -> torch.Tensor:
    return images[:, :, :32, :32].contiguous()


@pytest.fixture
def exact(small_cnn, small) -> torch.Tensor:
    """Captum's exact Shapley values of the five features, zero baseline, TARGETS."""
    from captum.attr import ShapleyValues

    return ShapleyValues(small_cnn).attribute(small, target=TARGETS, feature_mask=five_features(),
                                              perturbations_per_eval=120)


def per_feature(out: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each image's value per feature, read off the map (one element of each feature)."""
    mask = mask.expand(out.shape[0], *mask.shape[1:])
    values = []
    for o, m in zip(out, mask):
        ids = torch.unique(m)
        values.append(torch.stack([o[:1][m[:1] == i][0] for i in ids]))
    return values


class RegionSum(nn.Module):
    """Class c scores b_c + Σ_k coef[c, k] × mean of channel 0 over region k of ``mask``:
    with inputs of ones and a zero baseline, the score of a coalition is b + Σ coef z_k."""

    def __init__(self, mask: torch.Tensor, coef: torch.Tensor, channels: int = 3):
        super().__init__()
        flat = mask.view(-1)
        weight = torch.zeros(coef.shape[0], channels, flat.numel())
        for k in range(coef.shape[1]):
            region = flat == k
            weight[:, 0, region] = coef[:, k:k + 1] / region.sum()
        self.fc = nn.Linear(channels * flat.numel(), coef.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight.view(coef.shape[0], -1))
            self.fc.bias.copy_(torch.linspace(-1, 1, coef.shape[0]))

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def linear_game():
    """A RegionSum (10 classes) on a 4×4 grid of 8-pixel patches (32×32 inputs), its coefficients, inputs."""
    mask = grid_mask(torch.zeros(1, 3, 32, 32), 8)[0, 0]
    coef = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    return RegionSum(mask, coef).eval(), coef, torch.ones(2, 3, 32, 32)


# --------------------------------------------------------------------------- Kernel SHAP


def test_kernel_shap_with_every_coalition_equals_captum_shapley_values(small_cnn, small, exact):
    from captum.attr import ShapleyValues

    info: dict = {}
    ours = insights.attribute(small_cnn, small, "kernel_shap", TARGETS, feature_mask=five_features(),
                              n_samples=30, info=info)
    assert info["features"] == [5, 5]
    assert rel_error(ours, exact) < 1e-4
    # With a baseline image, on four features
    base = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = five_features().clamp(max=3)
    theirs = ShapleyValues(small_cnn).attribute(small, target=TARGETS, feature_mask=mask,
                                                baselines=base, perturbations_per_eval=24)
    ours = insights.attribute(small_cnn, small, "kernel_shap", TARGETS, feature_mask=mask,
                              n_samples=14, baselines=base)
    assert rel_error(ours, theirs) < 1e-4


def test_kernel_shap_sampled_values_add_up_to_the_score_difference(small_cnn, images):
    ours = insights.attribute(small_cnn, images, "kernel_shap", TARGETS, n_samples=40, n_segments=30)
    masks = feature_masks(images, dict(SLIC, n_segments=30))
    sums = torch.stack([v.double().sum() for v in per_feature(ours, masks)])
    gap = logits(small_cnn, images, TARGETS) - logits(small_cnn, torch.zeros_like(images), TARGETS)
    torch.testing.assert_close(sums, gap.double(), rtol=1e-4, atol=1e-5)


def test_shapley_methods_on_a_linear_game_give_its_coefficients(linear_game):
    model, coef, x = linear_game
    expected = coef[TARGETS]
    for method, params in [("kernel_shap", {"n_samples": 60}), ("shapley_sampling", {"n_samples": 1})]:
        out = insights.attribute(model, x, method, TARGETS, segmentation="grid", patch_size=8, **params)
        got = torch.stack([v.view(4, 8, 4, 8)[:, 0, :, 0].flatten() for v in out[:, 0]])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=method)


# --------------------------------------------------------------------------- LIME


def test_lime_recovers_the_coefficients_of_a_linear_model(linear_game):
    model, coef, x = linear_game
    out = insights.attribute(model, x, "lime", TARGETS, segmentation="grid", patch_size=8,
                             n_samples=80, alpha=0.0)
    got = torch.stack([v.view(4, 8, 4, 8)[:, 0, :, 0].flatten() for v in out[:, 0]])
    torch.testing.assert_close(got, coef[TARGETS], rtol=1e-4, atol=1e-5)
    # A ridge penalty shrinks the coefficients towards zero, all of them.
    shrunk = insights.attribute(model, x, "lime", TARGETS, segmentation="grid", patch_size=8,
                                n_samples=80, alpha=5.0)
    norm = shrunk[:, 0, ::8, ::8].flatten(1).norm(dim=1)
    assert (norm < coef[TARGETS].norm(dim=1) * 0.99).all()


def test_lime_equals_captum_lime_with_the_same_coalitions_kernel_and_ridge(small_cnn, small):
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    from insights.engine.families.surrogate import Lime as OurLime

    mask, n, width, alpha = five_features(), 40, 0.6, 0.5
    ours = insights.attribute(small_cnn, small[:1], "lime", 3, feature_mask=mask, n_samples=n,
                              kernel_width=width, alpha=alpha, seed=4)
    z, _ = OurLime().coalitions(5, {"n_samples": n, "seed": 4, "kernel_width": width})
    rows = iter(z)

    def draw(original, **kwargs):
        return next(rows).float().unsqueeze(0)

    def kernel(original, perturbed, interpretable, **kwargs):
        d = 1 - (interpretable.sum() / interpretable.numel()).sqrt()
        return torch.exp(-d**2 / width**2)

    lime = Lime(small_cnn, interpretable_model=SkLearnRidge(alpha=alpha), similarity_func=kernel,
                perturb_func=draw)
    theirs = lime.attribute(small[:1], target=3, feature_mask=mask, n_samples=n, baselines=0.0,
                            perturbations_per_eval=8)
    assert rel_error(ours, theirs) < 1e-4


# --------------------------------------------------------------------------- Shapley sampling


def test_shapley_sampling_converges_to_the_exact_values_like_captums(small_cnn, small, exact):
    from captum.attr import ShapleyValueSampling

    mask = five_features()
    seeds = range(3)

    def ours(n):
        return sum(rel_error(insights.attribute(small_cnn, small, "shapley_sampling", TARGETS,
                                                feature_mask=mask, n_samples=n, seed=s), exact)
                   for s in seeds) / len(seeds)

    def captums(n):
        errors = []
        for s in seeds:
            torch.manual_seed(s)
            errors.append(rel_error(ShapleyValueSampling(small_cnn).attribute(
                small, target=TARGETS, feature_mask=mask, n_samples=n, perturbations_per_eval=32),
                exact))
        return sum(errors) / len(errors)

    errors = [ours(n) for n in (1, 8, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 4  # about 1/sqrt(n): 8 times fewer at 64 than at 1
    assert errors[2] < 2 * captums(64)
    # Both draw each order with torch.randperm from a generator seeded the same: the same walks.
    torch.manual_seed(9)
    theirs = ShapleyValueSampling(small_cnn).attribute(small, target=TARGETS, feature_mask=mask,
                                                       n_samples=8, perturbations_per_eval=32)
    ours8 = insights.attribute(small_cnn, small, "shapley_sampling", TARGETS, feature_mask=mask,
                               n_samples=8, seed=9)
    assert rel_error(ours8, theirs) < 1e-4
    # Every order's gains add up to f(x) - f(baseline), so any number of samples keeps that.
    out = insights.attribute(small_cnn, small, "shapley_sampling", TARGETS, feature_mask=mask, n_samples=2)
    sums = torch.stack([v.double().sum() for v in per_feature(out, mask)])
    gap = logits(small_cnn, small, TARGETS) - logits(small_cnn, torch.zeros_like(small), TARGETS)
    torch.testing.assert_close(sums, gap.double(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- seeds, costs


@pytest.mark.parametrize("method,params", [("kernel_shap", {"n_samples": 30}),
                                           ("lime", {"n_samples": 30}),
                                           ("shapley_sampling", {"n_samples": 2})])
def test_a_seed_gives_the_same_map_and_another_seed_another(small_cnn, images, method, params):
    p = dict(params, n_segments=20)
    first = insights.attribute(small_cnn, images, method, TARGETS, seed=5, **p)
    again = insights.attribute(small_cnn, images, method, TARGETS, seed=5, **p)
    other = insights.attribute(small_cnn, images, method, TARGETS, seed=6, **p)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


class Counting(nn.Module):
    """Counts the rows of every forward pass of the model it wraps."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("method,params,passes", [
    ("kernel_shap", {"n_samples": 1000}, 2 + 30),  # every coalition of five features
    ("kernel_shap", {"n_samples": 20}, 2 + 20),
    ("lime", {"n_samples": 25}, 25),
    ("shapley_sampling", {"n_samples": 3}, 2 + 3 * 4),
    ("feature_ablation", {}, 1 + 5),
])
def test_cost_is_the_passes_made_and_progress_ends_there(small_cnn, small, method, params, passes):
    model = Counting(small_cnn)
    mask = five_features()
    assert insights.method_info(method, dict(params, feature_mask=mask), shape=(3, 32, 32))["cost"] == \
        {"forward": passes, "backward": 0}
    opts = EngineOptions(twin=False)  # the model itself runs, so it counts every row
    insights.attribute(model, small, method, TARGETS, feature_mask=mask, options=opts, **params)
    model.rows, seen = 0, []
    insights.attribute(model, small, method, TARGETS, feature_mask=mask, options=opts,
                       progress=lambda d, t: seen.append((d, t)), **params)
    assert model.rows == passes * 2
    assert seen[-1] == (passes * 2, passes * 2)


def test_slic_progress_counts_the_superpixels_found(small_cnn, images):
    seen = []
    info: dict = {}
    insights.attribute(small_cnn, images, "shapley_sampling", TARGETS, n_samples=1, n_segments=20,
                       info=info, progress=lambda d, t: seen.append((d, t)))
    total = sum(2 + k - 1 for k in info["features"])
    assert info["cost"]["forward"] == 2 + 19  # estimated from n_segments before segmenting
    assert all(t == total for _, t in seen) and seen[-1] == (total, total)


def test_default_costs_stay_modest():
    for method in ("kernel_shap", "lime", "shapley_sampling"):
        info = insights.method_info(method)
        assert info["signed"] is True and info["family"] == "perturbation"
        assert info["cost"]["forward"] <= 300 and info["cost"]["backward"] == 0
        params = {p["name"]: p for p in info["params"]}
        assert params["segmentation"]["default"] == "slic"
        assert params["segmentation"]["choices"] == ["slic", "grid"]
    assert {p["name"]: p for p in insights.method_info("feature_ablation")["params"]}[
        "segmentation"]["default"] == "grid"


# --------------------------------------------------------------------------- superpixels


def cat(side: int = 96) -> torch.Tensor:
    """scikit-image's cat photo, cropped and resized to side×side, ImageNet-normalised."""
    from skimage import data

    img = torch.tensor(data.chelsea()[:, 50:350]).permute(2, 0, 1).float().unsqueeze(0) / 255
    img = nn.functional.interpolate(img, size=(side, side), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (img - mean) / std


def test_slic_masks_are_consecutive_near_n_segments_and_deterministic(images):
    x = torch.cat([cat(), images[:, :, :48, :48].repeat(1, 1, 2, 2)])
    masks = feature_masks(x, SLIC)
    assert masks.shape == (3, 1, 96, 96) and masks.dtype == torch.long
    for m in masks:
        k = int(m.max()) + 1
        assert torch.equal(torch.unique(m), torch.arange(k))
        assert 20 <= k <= 60, k
    assert torch.equal(masks, feature_masks(x, SLIC))
    more = feature_masks(x[:1], dict(SLIC, n_segments=120))
    assert int(more.max()) + 1 > 2 * (int(masks[0].max()) + 1)


def test_slic_follows_a_colour_edge():
    x = torch.zeros(1, 3, 40, 40)
    x[:, 0, :, :17] = 2.0  # red left of column 17, blue right
    x[:, 2, :, 17:] = 2.0
    for sigma in (0.0, 1.0):  # the blur may move the boundary by a pixel or two, no more
        mask = feature_masks(x, dict(SLIC, n_segments=16, slic_sigma=sigma))[0, 0]
        left, right = set(mask[:, :15].unique().tolist()), set(mask[:, 19:].unique().tolist())
        assert left and right and not left & right


def test_grid_mask_is_the_patches_in_row_major_order():
    mask = feature_masks(torch.zeros(2, 3, 40, 36), {"segmentation": "grid", "patch_size": 16})
    assert mask.shape == (2, 1, 40, 36)
    expected = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    rows, cols = torch.tensor([0] * 16 + [1] * 16 + [2] * 8), torch.tensor([0] * 16 + [1] * 16 + [2] * 4)
    assert torch.equal(mask[0, 0], expected[rows][:, cols]) and torch.equal(mask[1], mask[0])


def test_given_mask_is_renumbered_per_image_and_overrides_the_segmentation():
    x = torch.zeros(2, 3, 4, 4)
    given = torch.tensor([[7, 7, 3, 3]] * 4).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    given[1, 0, 0, 0] = 9
    mask = feature_masks(x, dict(SLIC, feature_mask=given))
    assert torch.equal(mask[0, 0, 0], torch.tensor([1, 1, 0, 0]))
    assert torch.equal(mask[1, 0, 0], torch.tensor([2, 1, 0, 0]))


# --------------------------------------------------------------------------- feature ablation


def test_feature_ablation_on_slic_equals_ablation_of_the_same_mask(small_cnn):
    x = cat(64).repeat(2, 1, 1, 1)
    x[1] = x[1].flip(-1)
    params = dict(SLIC, n_segments=25)
    ours = insights.attribute(small_cnn, x, "feature_ablation", TARGETS, **params)
    masks = feature_masks(x, params)
    given = insights.attribute(small_cnn, x, "feature_ablation", TARGETS, feature_mask=masks)
    assert torch.equal(ours, given)
    # Kernel SHAP reads the same masks: its map is constant on each superpixel.
    shap = insights.attribute(small_cnn, x, "kernel_shap", TARGETS, n_samples=30, **params)
    for o, m in zip(shap, masks):
        for k in range(int(m.max()) + 1):
            region = o[:, m[0] == k]
            assert torch.equal(region, region[:1, :1].expand_as(region))


def test_feature_ablation_grid_segmentation_equals_its_patch_grid(small_cnn, images):
    grid = insights.attribute(small_cnn, images, "feature_ablation", TARGETS, patch_size=16)
    mask = feature_masks(images, {"segmentation": "grid", "patch_size": 16})
    masked = insights.attribute(small_cnn, images, "feature_ablation", TARGETS, feature_mask=mask)
    torch.testing.assert_close(grid, masked, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method,params,field,words", [
    ("kernel_shap", {"n_segments": 1}, "n_segments", "at least 2"),
    ("lime", {"segmentation": "quickshift"}, "segmentation", "one of slic, grid"),
    ("shapley_sampling", {"n_samples": 0}, "n_samples", "at least 1"),
    ("lime", {"kernel_width": 0}, "kernel_width", "at least 0.01"),
    ("lime", {"alpha": -1}, "alpha", "at least 0"),
    ("kernel_shap", {"seed": -1}, "seed", "at least 0"),
    ("kernel_shap", {"compactness": 0}, "compactness", "at least 0.01"),
    ("feature_ablation", {"slic_sigma": -1}, "slic_sigma", "at least 0"),
    ("kernel_shap", {"feature_mask": torch.zeros(1, 1, 64, 64)}, "feature_mask", "integer tensor"),
    ("lime", {"feature_mask": torch.zeros(1, 1, 5, 5, dtype=torch.long)}, "feature_mask", "does not broadcast"),
    ("shapley_sampling", {"baselines": torch.zeros(4, 4)}, "baselines", "does not broadcast"),
])
def test_bad_parameters_name_the_field(small_cnn, images, method, params, field, words):
    with pytest.raises(ParamError) as err:
        insights.attribute(small_cnn, images, method, TARGETS, **params)
    assert err.value.field == field and words in str(err.value), str(err.value)
