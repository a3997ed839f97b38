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
