"""The benchmark tool: its table, its Captum peers and its errors (cheap methods only)."""
import pytest
import torch

from insights import bench


def test_bench_times_methods_against_captum(capsys):
    assert bench.main(["--methods", "saliency", "grad_cam", "deeplift", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line and line[0].isalpha()}
    assert lines["method"][:4] == ["method", "captum", "ms", "captum"]
    # Exact peers: ours equals Captum bit for bit on these.
    assert lines["saliency"][-2] == "0.0e+00"
    assert lines["grad_cam"][-2] == "0.0e+00"
    # Captum's DeepLift cannot handle ResNet's re-used in-place ReLUs; ours still gets timed.
    assert "captum fails" in " ".join(lines["deeplift"])
    assert "deeplift: captum fails:" in out


def test_bench_rejects_unknown_methods(capsys):
    assert bench.main(["--methods", "saliency", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s): nope" in err and "occlusion" in err


def test_table_shows_ratios_and_bf16_correlation():
    rows = [
        {"method": "occlusion", "captum_ms": 8000.0, "captum_best_ms": 7000.0, "ours_ms": 4000.0,
         "peer": True, "captum_error": None, "max_rel_diff": 2e-5},
        {"method": "occlusion (bf16)", "captum_ms": 8000.0, "captum_best_ms": 7000.0,
         "ours_ms": 2000.0, "peer": True, "captum_error": None, "corr_fp32": 0.99876},
    ]
    table = bench.format_table(rows).splitlines()
    assert table[2].split() == ["occlusion", "8,000", "7,000", "4,000", "2.00", "1.75", "2.0e-05", "-"]
    assert table[3].split()[-4:] == ["4.00", "3.50", "-", "0.9988"]


def test_together_line_reports_fewer_shared_passes():
    line = bench.format_together({"passes": {"separate": {"forward": 6, "backward": 6},
                                             "shared": {"forward": 2, "backward": 2}},
                                  "separate_ms": 300.0, "shared_ms": 100.0})
    assert "one by one 6 forward + 6 backward" in line and "shared 2 + 2" in line and "(3.00x)" in line


def _row(method, captum, best, ours, **extra):
    return {"method": method, "captum_ms": captum, "captum_best_ms": best, "ours_ms": ours,
            "peer": True, "captum_error": None, **extra}


def test_roofline_sets_each_row_against_the_peak_of_its_precision():
    rows = [_row("occlusion", 8000.0, 7000.0, 17680.0, precision="fp32",
                 cost={"forward": 442, "backward": 0}),
            _row("occlusion (bf16)", 8000.0, 7000.0, 4420.0, precision="bf16",
                 cost={"forward": 442, "backward": 0}),
            _row("integrated_gradients", 3000.0, 2000.0, 3000.0, precision="fp32",
                 cost={"forward": 50, "backward": 50}),
            _row("deeplift", None, None, 10.0, precision="fp32", cost=None)]  # no passes known
    flops = {"forward": 2e9, "backward": 1e9}
    peaks = {"fp32": {"matmul": 80e9, "conv": 100e9}, "bf16": {"matmul": 400e9, "conv": 300e9}}
    lines = bench.format_roofline(rows, flops, peaks)
    assert lines[0].startswith("against the hardware")
    assert "fp32 100 GFLOP/s (conv)" in lines[0] and "bf16 400 GFLOP/s (matmul)" in lines[0]
    assert "2.00 GFLOP forward, 1.00 backward" in lines[0]
    occ, occ_bf16, ig = (line.split() for line in lines[3:])  # deeplift has no passes: no row
    # 442 passes of 2 GFLOP: 884 GFLOP, 8.84 s at 100 GFLOP/s; 17.68 s is 50 GFLOP/s, half the peak.
    assert occ == ["occlusion", "442+0", "884.0", "8,840", "17,680", "50", "50%"]
    # The bf16 row is set against the bf16 peak: 200 GFLOP/s of 400.
    assert occ_bf16 == ["occlusion", "(bf16)", "442+0", "884.0", "2,210", "4,420", "200", "50%"]
    # Backward passes count at their own FLOPs: 50 × 2 + 50 × 1 = 150 GFLOP in 3 s.
    assert ig == ["integrated_gradients", "50+50", "150.0", "1,500", "3,000", "50", "50%"]


def test_pass_flops_counts_convolutions_and_products_and_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    flops = bench.pass_flops(model, torch.randn(2, 3, 8, 8))
    conv, linear = 2 * (3 * 9) * 4 * 8 * 8, 2 * 256 * 10
    assert flops == {"forward": conv + linear, "backward": conv + linear}
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_peak_flops_measures_both_kernels(precision):
    rates = bench.peak_flops(torch.device("cpu"), precision, scale=1 / 16)
    assert set(rates) == {"matmul", "conv"} and all(0 < r < 1e15 for r in rates.values())


def test_main_prints_the_roofline_for_each_row(capsys):
    assert bench.main(["--methods", "saliency", "--repeat", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("against the hardware"))
    row = out[at + 3].split()
    assert row[:2] == ["saliency", "1+1"] and row[-1].endswith("%")
    # ResNet-18 at 224: 1.8 G multiply-adds per forward pass, so 3.6 GFLOP, and as many back.
    assert float(row[2]) == pytest.approx(7.3, abs=0.1)


def test_fp64_columns_show_distance_from_the_float64_map(capsys):
    assert bench.main(["--methods", "saliency", "--repeat", "1", "--fp64"]) == 0
    out = capsys.readouterr().out
    head, _, row = out.splitlines()[:3]
    assert "captum vs fp64" in head and "ours vs fp64" in head
    captum64, ours64 = (float(v) for v in row.split()[-2:])
    # Our saliency is Captum's bit for bit, so both sit equally far from the float64 map; a
    # random ResNet-18's pointwise gradient is ill-conditioned (a few ReLUs and max-pool
    # choices flip with fp32 rounding), so that distance is well above fp32's 1e-7.
    assert captum64 == ours64 and 0 < ours64 < 0.1


def test_fast_path_flags_reach_the_engine_and_declines_are_listed(capsys, monkeypatch):
    # A 2×2 grid of windows: occlusion through the engine's scoring seam in a second or two.
    monkeypatch.setitem(bench.PARAMS, "occlusion",
                        {"sliding_window_shapes": (3, 112, 112), "strides": (3, 112, 112), "baselines": 0.0})
    assert bench.main(["--methods", "occlusion", "--repeat", "1", "--no-cpu-slices"]) == 0
    out, err = capsys.readouterr()
    assert "fast paths twin on, cuda_graphs on, cuda_fused on, cpu_slices off" in err
    declined = out.split("fast paths declined:\n")[1].splitlines()
    assert "  cpu_slices: off (EngineOptions.cpu_slices) (occlusion, occlusion (bf16))" in declined
    assert not any(line.startswith("  twin:") for line in declined)  # the twin still ran


def test_declined_fast_paths_are_grouped_by_reason():
    rows = [{"method": "occlusion", "fast_paths": {"twin": "used", "cuda_graphs": "declined: only on a GPU"}},
            {"method": "occlusion (bf16)", "fast_paths": {"cuda_graphs": "declined: only on a GPU",
                                                          "cuda_fused": "declined: only for bf16 on a GPU"}},
            {"method": "saliency", "fast_paths": {}}]
    assert bench.format_declined(rows) == [
        "fast paths declined:",
        "  cuda_graphs: only on a GPU (occlusion, occlusion (bf16))",
        "  cuda_fused: only for bf16 on a GPU (occlusion (bf16))"]
    assert bench.format_declined(rows[2:]) == []
