"""insights.bench_surrogate: times ours and Captum's on the same mask and prints the ratio."""
import torch

from insights import bench_surrogate


def test_bench_prints_both_times_the_ratio_and_the_agreement(capsys):
    assert bench_surrogate.main(["--model", "resnet18", "--side", "32", "--n-segments", "6",
                                 "--n-samples", "40", "--permutations", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("resnet18, random weights, 1×3×32×32, target 208, SLIC n_segments 6")
    assert out[1].split() == ["method", "features", "samples", "captum", "ms", "ours", "ms", "ratio", "corr"]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert list(rows) == ["kernel_shap", "lime", "shapley_sampling"]
    for method, cells in rows.items():
        theirs, ours, ratio = (float(c.replace(",", "")) for c in cells[3:6])
        assert abs(ratio - theirs / ours) < 0.01 * ratio + 0.01
    # Both sides estimate the same Shapley values of a handful of features: close agreement.
    assert float(rows["kernel_shap"][6]) > 0.9 and float(rows["shapley_sampling"][6]) > 0.9


def test_rows_are_formatted_with_the_ratio_of_captum_over_ours():
    text = bench_surrogate.format_rows([{"method": "lime", "features": 48, "samples": 200,
                                         "theirs_ms": 300.0, "ours_ms": 100.0, "corr": 0.5}])
    assert text.splitlines()[1].split() == ["lime", "48", "200", "300.0", "100.0", "3.00", "0.5000"]


def test_feature_correlation_reads_one_value_per_feature():
    mask = torch.tensor([[0, 0, 1], [2, 2, 1]]).view(1, 1, 2, 3)
    ours = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 2.0]).view(1, 1, 2, 3)
    assert abs(bench_surrogate.feature_correlation(ours, 2 * ours + 1, mask) - 1) < 1e-9
    assert abs(bench_surrogate.feature_correlation(ours, -ours, mask) + 1) < 1e-9
