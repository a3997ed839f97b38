"""The pointing check (known answers on hand-made maps and boxes) and the model-randomisation
sanity check: which blocks, Spearman against scipy, seeded re-initialisation, a method that
ignores the model is flagged while Grad-CAM and saliency are not, the user's model untouched,
no copies left behind, progress, cancel and refused parameters; then EfficientNet-Lite0."""
import gc
import importlib
import threading

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from scipy import stats
from torch import nn

import insights
from insights import Cancelled, ParamError
from insights.engine import registry as methods
from insights.engine.errors import UnsupportedModel
from insights.engine.method import Method
from insights.engine.params import Cost

checks = importlib.import_module("insights.engine.checks")
probe = importlib.import_module("insights.engine.probe")
twin = importlib.import_module("insights.engine.fast.twin")

H, W = 12, 16


class Flat(nn.Module):
    """Two logits that pointing never looks at (it makes no model pass)."""

    def forward(self, x):
        return torch.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)


def point(attribution, box, n=1):
    return insights.evaluate(Flat(), torch.zeros(n, 3, H, W), attribution, 0, "pointing", box=box)


# --------------------------------------------------------------------------- pointing


def test_a_map_only_inside_the_box_scores_one_and_hits():
    a = torch.zeros(1, 1, H, W)
    a[0, 0, 2:6, 3:11] = torch.rand(4, 8) + 0.1  # x 3..10, y 2..5
    out = point(a, [3, 2, 11, 6])
    assert out["energy"] == 1.0 and out["hit"] == 1.0
    assert out["energies"] == [1.0] and out["hits"] == [True]
    assert out["chance"] == pytest.approx(8 * 4 / (H * W))
    assert out["better"] == "higher" and out["params"] == {"box": [3, 2, 11, 6]}


def test_a_map_only_outside_the_box_scores_zero_and_misses():
    a = torch.rand(1, 3, H, W) + 0.1
    a[0, :, 2:6, 3:11] = 0.0
    out = point(a, [3, 2, 11, 6])
    assert out["energy"] == 0.0 and out["hits"] == [False]


@pytest.mark.parametrize("box,hit", [([5, 4, 9, 12], False), ([0, 0, 3, 3], True)])
def test_a_uniform_map_scores_the_box_share_and_peaks_at_the_first_pixel(box, hit):
    out = point(torch.full((1, 3, H, W), 0.25), box)
    assert out["energy"] == pytest.approx(out["chance"], abs=1e-12)
    x0, y0, x1, y1 = box
    assert out["chance"] == pytest.approx((x1 - x0) * (y1 - y0) / (H * W))
    assert out["hits"] == [hit]  # a tie: the first pixel in row-major order is the peak


def test_negative_attribution_is_ignored_and_channels_are_summed():
    a = torch.zeros(1, 2, H, W)
    a[0, 0, 0, 0] = 3.0  # inside the box: +3, and -10 beside it
    a[0, 1, 0, 1] = -10.0
    a[0, 0, 8, 8] = 1.0  # outside: +1 in one channel, cancelled pixel (+2, -2) beside it
    a[0, 0, 8, 9], a[0, 1, 8, 9] = 2.0, -2.0
    out = point(a, [0, 0, 4, 4])
    assert out["energy"] == pytest.approx(3 / (3 + 1))
    assert out["hits"] == [True]  # the summed peak is 3 at (0, 0)


def test_energy_follows_the_definition_per_image_and_the_means_over_images():
    """Score-CAM's energy-based pointing game: positive attribution inside the box over all
    positive attribution, computed here with numpy on random signed maps."""
    a = torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(4))
    box = [2, 3, 9, 10]
    out = point(a, box, n=3)
    s = a.sum(1).numpy().astype(np.float64)
    pos = np.clip(s, 0, None)
    want = pos[:, 3:10, 2:9].sum((1, 2)) / pos.sum((1, 2))
    assert out["energies"] == pytest.approx(want.tolist(), rel=1e-12)
    assert out["energy"] == pytest.approx(want.mean(), rel=1e-12)
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in s]
    hits = [bool(3 <= r < 10 and 2 <= c < 9) for r, c in peaks]
    assert out["hits"] == hits and out["hit"] == pytest.approx(sum(hits) / 3)


def test_a_map_with_nothing_positive_has_no_energy_anywhere():
    out = point(-torch.ones(1, 1, H, W), [0, 0, 4, 4])
    assert out["energy"] == 0.0


@pytest.mark.parametrize("params,message", [
    ({}, "required"),
    ({"box": [3, 2, 3, 6]}, "empty"),
    ({"box": [3, 6, 11, 2]}, "empty"),
    ({"box": [3, 2, 17, 6]}, "not inside the 16×12 input"),
    ({"box": [-1, 0, 4, 4]}, "not inside"),
    ({"box": [0, 0, 4, 13]}, "not inside"),
    ({"box": [0, 0, 4]}, "4 items"),
    ({"box": "a,b,c,d"}, "integer"),
])
def test_bad_boxes_are_refused_by_name(params, message):
    with pytest.raises(ParamError, match=message) as err:
        insights.evaluate(Flat(), torch.zeros(1, 3, H, W), torch.ones(1, 1, H, W), 0, "pointing", **params)
    assert err.value.field == "box"


def test_pointing_describes_itself_and_costs_no_pass():
    info = insights.metric_info("pointing")
    assert info["cost"] == {"forward": 0, "backward": 0} and info["needs_method"] is False
    assert [p["name"] for p in info["params"]] == ["box"] and info["params"][0]["length"] == 4
    seen = []
    insights.evaluate(Flat(), torch.zeros(1, 3, H, W), torch.ones(1, 1, H, W), 0, "pointing",
                      box=[0, 0, 2, 2], progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 1)]
    with pytest.raises(ParamError) as err:
        insights.evaluate(Flat(), torch.zeros(1, 3, H, W), torch.ones(1, 1, H, W), 0, "pointing",
                          box=[0, 0, 2, 2], method="saliency")
    assert err.value.field == "method"


# --------------------------------------------------------------------------- which blocks


def test_resnet_blocks_are_its_top_level_children_from_the_output_down():
    with torch.device("meta"):  # the structure only: no weights drawn
        resnet = tvm.resnet18()
    assert checks.blocks_of(resnet) == [["fc"], ["layer4"], ["layer3"], ["layer2"],
                                                ["layer1"], ["conv1", "bn1"]]


def test_a_features_classifier_model_is_split_into_its_feature_layers():
    with torch.device("meta"):
        vgg, vgg_bn = checks.blocks_of(tvm.vgg11()), checks.blocks_of(tvm.vgg11_bn())
    assert vgg[:4] == [["classifier"], ["features.18"], ["features.16"], ["features.13"]]
    assert len(vgg) == 9  # the classifier and the eight convolutions
    assert vgg_bn[1] == ["features.25", "features.26"]  # a batch norm goes with its convolution


def test_a_wrapper_with_one_block_is_looked_through():
    """A ViT-like model: encoder = (layers, norm); its parts are the layers, the norm joins the
    last one; the parameters the root holds itself are not a block."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
            self.ln = nn.LayerNorm(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4))
            self.embed = nn.Linear(4, 4)
            self.encoder = Encoder()
            self.drop = nn.Dropout()
            self.head = nn.Linear(4, 2)

    assert checks.blocks_of(Net()) == [["head"], ["encoder.layers.3", "encoder.ln"], ["encoder.layers.2"],
                                       ["encoder.layers.1"], ["encoder.layers.0"], ["embed"]]


# --------------------------------------------------------------------------- Spearman


def test_average_ranks_and_spearman_equal_scipys():
    g = torch.Generator().manual_seed(0)
    for ties in (False, True):
        a = torch.randn(500, generator=g)
        b = a + torch.randn(500, generator=g)
        if ties:  # many ties, as in ReLU'd maps
            a, b = a.clamp(min=0).round(decimals=1), b.clamp(min=0).round(decimals=1)
        assert checks.average_ranks(a).numpy() == pytest.approx(stats.rankdata(a.numpy()), abs=0)
        assert checks.spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    m = torch.rand(2, 7, 9, generator=g)
    assert checks.spearman(m[0], m[1]) == pytest.approx(
        stats.spearmanr(m[0].flatten(), m[1].flatten()).statistic, abs=1e-12)
    assert checks.spearman(a, -a) == pytest.approx(-1.0)


def test_spearman_of_constant_maps():
    """Undefined (scipy answers NaN): 1 for two constant maps, 0 against one."""
    a, z = torch.rand(30), torch.zeros(30)
    with pytest.warns(stats.ConstantInputWarning):
        assert np.isnan(stats.spearmanr(a.numpy(), z.numpy()).statistic)
    assert checks.spearman(a, z) == 0.0 and checks.spearman(z, z + 3) == 1.0


# --------------------------------------------------------------------------- randomisation


def test_reinitialise_is_seeded_leaves_the_global_rng_alone_and_resets_batch_norms():
    def block():
        b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        b[1].running_mean.fill_(5.0)
        return b

    state = torch.get_rng_state()
    one, two, other = block(), block(), block()
    state = torch.get_rng_state()
    before = one[0].weight.clone()
    checks.reinitialise([one], 7)
    checks.reinitialise([two], 7)
    checks.reinitialise([other], 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(one[0].weight, two[0].weight) and not torch.equal(one[0].weight, other[0].weight)
    assert not torch.equal(one[0].weight, before)
    assert torch.equal(one[1].running_mean, torch.zeros(4))  # as newly built

    class Scaled(nn.Module):  # a parameter with no reset_parameters: redrawn at its own scale
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(1, 3, 1000))

    s = Scaled()
    checks.reinitialise([s], 0)
    assert not torch.allclose(s.scale, torch.linspace(1, 3, 1000))
    assert s.scale.mean().item() == pytest.approx(2.0, abs=0.1)
    assert s.scale.std().item() == pytest.approx(torch.linspace(1, 3, 1000).std().item(), rel=0.1)


class SmallCNN(nn.Module):
    """A seeded 3×24×24 CNN: features (three convolutions) then fc over five classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def cnn():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SmallCNN().eval()


@pytest.fixture
def images():
    return torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def identity():
    """A method that shows the input itself, whatever the model (an edge detector would do the
    same): registered for the test, removed afterwards."""

    class Identity(Method):
        id = "test_identity"
        label = "Identity"
        family = "gradient"

        def cost(self, p, facts):
            return Cost(1, 0)

        def run(self, ctx, p):
            ctx.advance(ctx.inputs.shape[0])
            return ctx.inputs.clone()

    methods.register(Identity)
    yield "test_identity"
    del methods._entries["test_identity"]


def sanity(model, x, method, target=(0, 1), **params):
    target = list(target)[:x.shape[0]]
    a = insights.attribute(model, x, method, target)
    return insights.evaluate(model, x, a, target, "sanity_check", method=method, **params)


def test_the_small_cnn_stages_are_fc_then_each_convolution(cnn, images, identity):
    out = sanity(cnn, images, identity, blocks=4, flag_after=1)
    assert [s["blocks"] for s in out["stages"]] == [
        ["fc"], ["fc", "features.5"], ["fc", "features.5", "features.2"],
        ["fc", "features.5", "features.2", "features.0"]]


def test_a_method_that_ignores_the_model_is_flagged(cnn, images, identity):
    out = sanity(cnn, images, identity, blocks=4)
    assert all(s["spearman"] == pytest.approx([1.0, 1.0], abs=1e-12) for s in out["stages"])
    assert out["flagged"] == [True, True] and out["flag_after"] == 2 and out["threshold"] == 0.5
    assert out["maps"].shape == (2, 4, 1, 24, 24) and out["maps"].dtype == torch.float32
    for k in range(4):
        assert torch.equal(out["maps"][:, k], images.sum(1, keepdim=True))


@pytest.mark.parametrize("method", ["grad_cam", "saliency"])
def test_grad_cam_and_saliency_follow_the_weights(cnn, method):
    """With the top block (fc) random, the maps no longer agree with the original. On a small
    random-weight CNN one image's map can still agree by chance (Grad-CAM with 16 channels:
    up to 0.8 over other seeds of the model), so the mean over eight images is what is robust
    (below 0.35 for model seeds 0 to 5); on this seeded model none is flagged."""
    x = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    target = [0, 1, 2, 3, 4, 0, 1, 2]
    a = insights.attribute(cnn, x, method, target)
    out = insights.evaluate(cnn, x, a, target, "sanity_check", method=method, blocks=2, flag_after=1)
    top = torch.tensor(out["stages"][0]["spearman"])
    assert top.mean() < 0.35, top
    assert out["flagged"] == [False] * 8 and out["flag_after"] == 1


def test_same_seed_same_maps_another_seed_other_maps(cnn, images):
    a = insights.attribute(cnn, images, "saliency", [0, 1])
    kw = dict(method="saliency", blocks=2)
    one = insights.evaluate(cnn, images, a, [0, 1], "sanity_check", seed=5, **kw)
    two = insights.evaluate(cnn, images, a, [0, 1], "sanity_check", seed=5, **kw)
    other = insights.evaluate(cnn, images, a, [0, 1], "sanity_check", seed=6, **kw)
    assert torch.equal(one["maps"], two["maps"]) and one["stages"] == two["stages"]
    assert not torch.allclose(one["maps"], other["maps"])


def test_the_maps_are_the_method_on_a_copy_randomised_block_by_block(cnn, images):
    """Stage k's map is the method's map for the model with the first k blocks re-initialised
    from seed × 64 + k, cumulatively."""
    out = sanity(cnn, images, "grad_cam", blocks=2, seed=3)
    import copy
    model = copy.deepcopy(cnn)
    for k, names in enumerate([["fc"], ["features.5"]]):
        checks.reinitialise([model.get_submodule(n) for n in names], 3 * 64 + k)
        want = insights.attribute(model, images, "grad_cam", [0, 1]).sum(1)
        assert torch.allclose(out["maps"][:, k, 0], want, atol=1e-6)
    original = insights.attribute(cnn, images, "grad_cam", [0, 1]).sum(1).abs()
    for k in range(2):  # absolute values of the channel-summed maps, ranked as scipy does
        for i in range(2):
            want = stats.spearmanr(original[i].flatten(), out["maps"][i, k, 0].abs().flatten()).statistic
            assert out["stages"][k]["spearman"][i] == pytest.approx(want, abs=1e-12)


def test_the_users_model_and_the_global_rng_are_untouched(cnn, images):
    cnn.train()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    cnn.eval()
    with torch.inference_mode():
        logits = cnn(images)
    cnn.train()
    rng = torch.get_rng_state()
    sanity(cnn, images, "saliency", blocks=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert cnn.training and all(m.training for m in cnn.modules())
    after = cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    cnn.eval()
    with torch.inference_mode():
        assert torch.equal(cnn(images), logits)


def test_no_copy_outlives_the_call(cnn, images):
    """Neither the copies nor their probes and twins stay in memory (the engine's caches hold
    models weakly)."""
    def count():
        gc.collect()
        return sum(type(o) is SmallCNN for o in gc.get_objects())

    sanity(cnn, images, "integrated_gradients", blocks=1)  # warm the user's model's caches
    models, probes, twins = count(), len(probe._probe_cache), len(twin._cache)
    out = sanity(cnn, images, "integrated_gradients", blocks=3)
    assert len(out["stages"]) == 3
    assert count() == models == 1
    assert len(probe._probe_cache) == probes and len(twin._cache) == twins


def test_progress_counts_each_stage_and_a_short_model_finishes_early(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    seen = []
    a = insights.attribute(model, images, "saliency", 0)
    out = insights.evaluate(model, images, a, 0, "sanity_check", method="saliency", blocks=4, flag_after=3,
                            progress=lambda d, t: seen.append((d, t)))
    assert [s["blocks"] for s in out["stages"]] == [["4"], ["4", "0"]]  # two blocks only
    assert out["flag_after"] == 2 and out["maps"].shape[1] == 2
    total = insights.metric_info("sanity_check", {"blocks": 4}, method="saliency", shape=(3, 24, 24))["cost"]
    assert total == {"forward": 4, "backward": 4}
    assert seen[-1] == (4 * 2, 4 * 2) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cancel_stops_between_stages(cnn, images):
    stop = threading.Event()
    a = insights.attribute(cnn, images, "saliency", [0, 1])
    done = []

    def progress(d, t):
        done.append(d)
        if d >= 2:  # the first stage's two images
            stop.set()

    with pytest.raises(Cancelled):
        insights.evaluate(cnn, images, a, [0, 1], "sanity_check", method="saliency", blocks=4,
                          progress=progress, cancel=stop)
    assert max(done) == 2
    with pytest.raises(Cancelled):
        insights.evaluate(cnn, images, a, [0, 1], "sanity_check", method="saliency", cancel=lambda: True)


@pytest.mark.parametrize("params,field", [
    ({"blocks": 0}, "blocks"),
    ({"blocks": 33}, "blocks"),
    ({"blocks": 2, "flag_after": 3}, "flag_after"),
    ({"flag_after": 0}, "flag_after"),
    ({"threshold": 1.5}, "threshold"),
    ({"seed": -1}, "seed"),
    ({"layers": 2}, "layers"),
    ({"method": None}, "method"),
    ({"method": "nope"}, "method"),
    ({"method_params": {"abs": "maybe"}}, "abs"),
])
def test_bad_parameters_are_refused_by_name(cnn, images, params, field):
    kw = {"method": "saliency", **params}
    with pytest.raises(ParamError) as err:
        insights.evaluate(cnn, images, torch.ones(2, 1, 24, 24), [0, 1], "sanity_check", **kw)
    assert err.value.field == field and field in str(err.value)


def test_a_torchscript_model_is_refused(cnn, images):
    scripted = torch.jit.script(cnn)
    with pytest.raises(UnsupportedModel, match="TorchScript"):
        insights.evaluate(scripted, images, torch.ones(2, 1, 24, 24), [0, 1], "sanity_check",
                          method="saliency")


# --------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0():
    from insights.examples import lite0_photo, lite0_unavailable

    if lite0_unavailable():
        pytest.skip(lite0_unavailable())
    return lite0_photo("chelsea")


def test_lite0_guided_backprop_is_flagged_and_grad_cam_is_not(lite0, capsys):
    """Adebayo et al.'s finding on our default model: guided backprop's map stays the same
    picture with the head and the last layers random; Grad-CAM's does not survive the head."""
    model, x = lite0
    assert checks.blocks_of(model)[:3] == [["_fc"], ["_conv_head", "_bn1"], ["_blocks.15"]]
    found = {}
    for method in ("guided_backprop", "grad_cam"):
        found[method] = sanity(model, x, method, target=[285], blocks=2)
    guided, cam = found["guided_backprop"], found["grad_cam"]
    assert guided["flagged"] == [True] and min(s["spearman"][0] for s in guided["stages"]) > 0.9
    assert cam["flagged"] == [False] and cam["stages"][1]["spearman"][0] < 0.2
    with capsys.disabled():
        print("\nLite0 sanity check, Spearman per stage: " + "; ".join(
            f"{m} {[round(s['spearman'][0], 3) for s in out['stages']]}" for m, out in found.items()))
