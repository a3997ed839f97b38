"""The benchmark tool: its table, its Captum peers and its errors (cheap methods only)."""
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


def test_targets_read_ratios_and_carry_ig_times_to_the_anchor_machine():
    rows = [_row("occlusion", 16400.0, 12000.0, 12600.0),  # 1.30x: met
            _row("occlusion (bf16)", 16400.0, 12000.0, 5000.0, corr_fp32=0.985),  # 3.28x, corr low
            # Captum's IG 5.8 s / 2.8 s here against 2.9 s / 1.4 s there: 2x slower here.
            _row("integrated_gradients", 5800.0, 2800.0, 2000.0),  # 1,000 ms there: met
            _row("integrated_gradients (bf16)", 5800.0, 2800.0, 1300.0, corr_fp32=0.995)]
    lines = bench.format_targets(rows)
    assert lines[0].startswith("targets")
    assert lines[1].endswith("1.30x Captum's default (need 1.3x): met")
    assert "3.28x" in lines[2] and "corr 0.9850" in lines[2] and lines[2].endswith("NOT met")
    assert "2,000 ms here; on the anchor machine 1,000 ms scaled by Captum's IG in batches of 10" in lines[3]
    assert "(1,000 ms by Captum's IG default; 1,000 ms by its default occlusion)" in lines[3]
    assert lines[3].endswith(": met")
    assert "650 ms scaled" in lines[4] and lines[4].endswith("NOT met")  # 650 > 600
    # The like-for-like scale (Captum's IG in batches of 10) decides; the others are shown.
    lines = bench.format_targets([_row("integrated_gradients", 2900.0, 2800.0, 2000.0)])
    assert "1,000 ms scaled by" in lines[1] and "(2,000 ms by Captum's IG default)" in lines[1]
    assert lines[1].endswith(": met")
    lines = bench.format_targets([_row("integrated_gradients", 5800.0, 2000.0, 2000.0)])
    assert "1,400 ms scaled by" in lines[1] and lines[1].endswith("NOT met")


def test_gpu_targets_take_any_precision_whose_map_is_close_enough():
    rows = [_row("occlusion", 860.0, 46.0, 30.0),
            _row("occlusion (bf16)", 860.0, 46.0, 7.5, corr_fp32=0.9991),  # met
            _row("integrated_gradients", 11.7, 16.0, 9.0),
            _row("integrated_gradients (bf16)", 11.7, 16.0, 3.5, corr_fp32=0.985),  # corr low
            _row("saliency", 6.6, 6.6, 1.0)]
    lines = bench.format_gpu_targets(rows, "resnet18")
    assert lines[0] == "targets (issue 5, GPU; resnet18):"
    assert lines[1] == ("  occlusion: occlusion 30.0 ms, occlusion (bf16) 7.5 ms (corr 0.9991) "
                        "(need <= 8 ms): met")
    assert "integrated_gradients (bf16) 3.5 ms (corr 0.9850)" in lines[2]
    assert lines[2].endswith("(need <= 4 ms): NOT met")
    assert len(lines) == 3  # saliency has no target
    lines = bench.format_gpu_targets(rows[:2], "resnet50")
    assert lines[1].endswith("(need <= 15 ms): met")
    assert bench.format_gpu_targets(rows, "vgg11") == []


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
