"""Occlusion and feature ablation: parity with Captum, known values, errors, progress."""
import math

import pytest
import torch
from torch import nn

import insights
from insights import Cancelled, ParamError

import captum.attr as captum_attr


def batch(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(ours, theirs, rel=1e-4):
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert scale > 0
    assert err <= rel * scale, f"max |ours - captum| = {err:.3g}, max |captum| = {scale:.3g}"


def linear_model(weight):
    """f(x)[k] = sum(weight[k] * x): attributions of a linear model are known in closed form."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight[0].numel(), weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight.flatten(1))
    return model.eval()


# --------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("window,stride,baseline", [
    ((3, 13, 13), (3, 6, 6), 0.0),      # 10 positions per axis, the last clipped at the border
    ((1, 20, 9), (1, 11, 5), 0.5),      # per-channel windows, uneven strides on every axis
])
def test_occlusion_matches_captum(request, model_name, window, stride, baseline):
    model = request.getfixturevalue(model_name)
    x = batch(2, 64)
    target = torch.tensor([3, 7])
    ours = insights.attribute(model, x, "occlusion", target, sliding_window_shapes=window,
                              strides=stride, baselines=baseline)
    theirs = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=window, strides=stride, baselines=baseline, target=target,
        perturbations_per_eval=16)
    assert_close(ours, theirs)


def test_occlusion_matches_captum_example_config(resnet18):
    """Captum's tutorial setting: 45×45 windows every 9 pixels on a 224×224 image, class 208."""
    x = batch(1, 224, seed=5)
    ours = insights.attribute(resnet18, x, "occlusion", 208, sliding_window_shapes=(3, 45, 45),
                              strides=(3, 9, 9), baselines=0)
    theirs = captum_attr.Occlusion(resnet18).attribute(
        x, sliding_window_shapes=(3, 45, 45), strides=(3, 9, 9), baselines=0, target=208,
        perturbations_per_eval=32)
    assert_close(ours, theirs)


def test_occlusion_tensor_baseline_matches_captum(small_cnn):
    x = batch(1, 64, seed=2)
    baseline = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    ours = insights.attribute(small_cnn, x, "occlusion", 4, sliding_window_shapes=(3, 16, 16),
                              strides=(3, 12, 12), baselines=baseline)
    theirs = captum_attr.Occlusion(small_cnn).attribute(
        x, sliding_window_shapes=(3, 16, 16), strides=(3, 12, 12), baselines=baseline, target=4)
    assert_close(ours, theirs)


def test_occlusion_of_linear_model_is_known():
    """With non-overlapping windows and baseline 0, each element's map is the sum of w·x over
    its window; for a linear model that is exact."""
    torch.manual_seed(3)
    w = torch.randn(2, 3, 8, 8)
    x = torch.randn(1, 3, 8, 8)
    out = insights.attribute(linear_model(w), x, "occlusion", 1, sliding_window_shapes=(3, 4, 4),
                             strides=(3, 4, 4))
    contrib = (w[1] * x[0]).view(3, 2, 4, 2, 4).sum(dim=(0, 2, 4))  # per 4×4 block
    expected = contrib.repeat_interleave(4, 0).repeat_interleave(4, 1).expand(3, 8, 8)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_occlusion_chunks_do_not_change_the_map(small_cnn):
    x = batch(2, 64, seed=4)
    kwargs = dict(sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8))
    whole = insights.attribute(small_cnn, x, "occlusion", 1, **kwargs)
    tiny = insights.attribute(small_cnn, x, "occlusion", 1, memory_budget=1, **kwargs)
    torch.testing.assert_close(tiny, whole, rtol=1e-5, atol=1e-6)


def test_occlusion_reports_progress_and_cost(small_cnn):
    x = batch(2, 64)
    seen = []
    info = {}
    insights.attribute(small_cnn, x, "occlusion", 0, sliding_window_shapes=(3, 16, 16),
                       strides=(3, 8, 8), progress=lambda d, t: seen.append((d, t)),
                       memory_budget=1, info=info)
    positions = 7 * 7
    assert info["cost"] == {"forward": positions + 1, "backward": 0}
    assert seen[-1] == (2 * (positions + 1), 2 * (positions + 1))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 10
    meta = insights.method_info("occlusion")
    assert meta["cost"] == {"forward": 13 * 13 + 1, "backward": 0}  # defaults on 3×224×224
    assert meta["family"] == "perturbation" and meta["signed"] is True


def test_occlusion_cancel_stops_between_chunks(small_cnn):
    calls = []

    def progress(done, total):
        calls.append(done)

    with pytest.raises(Cancelled):
        insights.attribute(small_cnn, batch(1, 64), "occlusion", 0, memory_budget=1,
                           sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8),
                           progress=progress, cancel=lambda: len(calls) >= 3)
    assert len(calls) == 3  # stopped right after the third report, not after all 65 passes


@pytest.mark.parametrize("params,field,text", [
    ({"sliding_window_shapes": (3, 80, 8)}, "sliding_window_shapes", "larger than the input"),
    ({"sliding_window_shapes": (3, 8, 8), "strides": (3, 9, 8)}, "strides", "larger than the window"),
    ({"sliding_window_shapes": (8, 8)}, "sliding_window_shapes", "must have 3 items"),
    ({"strides": (3, 0, 8)}, "strides", "at least 1"),
    ({"precision": "fp8"}, "precision", "fp32, bf16"),
])
def test_occlusion_bad_params_name_the_field(small_cnn, params, field, text):
    with pytest.raises(ParamError) as err:
        insights.attribute(small_cnn, batch(1, 64), "occlusion", 0, **params)
    assert err.value.field == field
    assert text in str(err.value)


def test_bf16_occlusion_correlates_with_fp32(resnet18):
    x = batch(1, 96, seed=6)
    kwargs = dict(sliding_window_shapes=(3, 24, 24), strides=(3, 12, 12))
    exact = insights.attribute(resnet18, x, "occlusion", 208, **kwargs)
    fast = insights.attribute(resnet18, x, "occlusion", 208, precision="bf16", **kwargs)
    assert fast.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([exact.flatten(), fast.flatten()]))[0, 1].item()
    assert corr >= 0.99
    assert not torch.equal(exact, fast)  # it really ran in bf16


# --------------------------------------------------------------------------- feature ablation


def grid_mask(size, patch):
    cells = math.ceil(size / patch)
    idx = torch.arange(size) // patch
    return (idx.view(-1, 1) * cells + idx.view(1, -1)).view(1, 1, size, size)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_feature_ablation_patch_grid_matches_captum(request, model_name):
    model = request.getfixturevalue(model_name)
    x = batch(2, 64, seed=7)
    ours = insights.attribute(model, x, "feature_ablation", 5, patch_size=20)  # 20 ∤ 64
    theirs = captum_attr.FeatureAblation(model).attribute(
        x, feature_mask=grid_mask(64, 20), target=5, perturbations_per_eval=8)
    assert_close(ours, theirs)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_feature_ablation_explicit_mask_matches_captum(request, model_name):
    model = request.getfixturevalue(model_name)
    x = batch(2, 64, seed=8)
    # Non-contiguous ids, features that differ per channel.
    mask = torch.tensor([3, 7, 100, 42])[torch.randint(0, 4, (1, 3, 64, 64),
                                                       generator=torch.Generator().manual_seed(0))]
    ours = insights.attribute(model, x, "feature_ablation", 2, feature_mask=mask, baselines=0.25)
    theirs = captum_attr.FeatureAblation(model).attribute(
        x, feature_mask=mask, target=2, baselines=0.25)
    assert_close(ours, theirs)
    assert insights.method_info("feature_ablation", {"feature_mask": mask})["cost"]["forward"] == 5


def test_feature_ablation_of_linear_model_is_known():
    torch.manual_seed(9)
    w = torch.randn(3, 3, 6, 6)
    x = torch.randn(1, 3, 6, 6)
    mask = (torch.arange(6) >= 3).long().view(1, 1, 1, 6).expand(1, 3, 6, 6)  # left | right half
    out = insights.attribute(linear_model(w), x, "feature_ablation", 2, feature_mask=mask)
    contrib = w[2] * x[0]
    left, right = contrib[..., :3].sum(), contrib[..., 3:].sum()
    expected = torch.where(mask[0] == 1, right, left)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_feature_ablation_mask_errors(small_cnn):
    x = batch(1, 64)
    with pytest.raises(ParamError) as err:
        insights.attribute(small_cnn, x, "feature_ablation", 0, feature_mask=torch.zeros(1, 3, 64, 64))
    assert err.value.field == "feature_mask" and "integer" in str(err.value)
    with pytest.raises(ParamError) as err:
        insights.attribute(small_cnn, x, "feature_ablation", 0,
                           feature_mask=torch.zeros(1, 3, 32, 32, dtype=torch.long))
    assert err.value.field == "feature_mask" and "broadcast" in str(err.value)


def test_feature_ablation_patch_cost():
    assert insights.method_info("feature_ablation")["cost"] == {"forward": 14 * 14 + 1, "backward": 0}
    assert insights.method_info("feature_ablation", {"patch_size": 300})["cost"]["forward"] == 2


def test_true_fp32_turns_tf32_off_and_restores_it_after_the_last_overlapping_call():
    from insights.engine.precision import true_fp32

    cuda = torch.device("cuda")  # the flags exist without a GPU; nothing runs on one here
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        first, second = true_fp32(cuda), true_fp32(cuda)
        first.__enter__()
        second.__enter__()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        first.__exit__(None, None, None)  # not LIFO, as two threads may leave
        assert not torch.backends.cudnn.allow_tf32  # the second call is still inside
        second.__exit__(None, None, None)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with true_fp32(torch.device("cpu")):  # no-op on CPU
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("n, windows, strides, tensor_base", [
    (1, (3, 16, 16), (3, 8, 8), False),   # windows through all channels, clipped at the border
    (2, (3, 20, 12), (3, 7, 9), True),    # two images, a per-pixel baseline
    (3, (2, 9, 9), (1, 5, 5), True),      # windows over some channels only
])
def test_cpu_batches_pasted_row_by_row_equal_the_masked_batches(n, windows, strides, tensor_base):
    from insights.engine.families.perturbation import _masked_batch, _paste_windows, window_masks

    gen = torch.Generator().manual_seed(n)
    cl = torch.channels_last
    x = torch.randn(n, 3, 40, 36, generator=gen).contiguous(memory_format=cl)
    base = (torch.randn(n, 3, 40, 36, generator=gen) if tensor_base
            else torch.full((n, 3, 40, 36), 0.25)).contiguous(memory_format=cl)
    masks = [window_masks(d, w, s, x.device) for d, w, s in zip(x.shape[1:], windows, strides)]
    counts = [m.shape[0] for m in masks]
    rows = torch.arange(math.prod(counts) * n)
    window, sample = rows // n, rows % n
    kc, rest = window // (counts[1] * counts[2]), window % (counts[1] * counts[2])
    index = (kc, rest // counts[2], rest % counts[2])
    pasted = _paste_windows(x, base, sample, index, windows, strides)
    masked = _masked_batch(x, base, sample, masks, index, bool(masks[0].all()))
    assert torch.equal(pasted, masked)
    assert pasted.is_contiguous(memory_format=cl)
    assert (pasted != x[sample]).any()  # windows were pasted
