"""The memory benchmark measures each case in a process of its own and reports what it answered."""
import math

from insights import bench_memory


def test_bench_memory_reports_a_refused_and_an_accepted_upload(capsys):
    rows = bench_memory.main(["--cases", "wide_40000x1", "jpeg_40mp"])
    wide, jpeg = rows
    assert wide["answer"] == "400 bad_image"  # refused from its header: nothing decoded
    assert jpeg["answer"] == "201 2048×2048, predict 200"  # reduced to UPLOAD_MAX_SIDE, then predicted
    for row in rows:
        assert math.isfinite(row["peak_mb"]) and row["peak_mb"] >= row["base_mb"] > 0
        assert row["growth_mb"] == row["peak_mb"] - row["base_mb"]
    assert wide["growth_mb"] < 20  # refusing it allocates next to nothing
    printed = capsys.readouterr().out
    assert "peak RSS MB" in printed and "wide_40000x1" in printed and "jpeg_40mp" in printed


def test_upload_cases_are_the_files_they_say():
    from io import BytesIO

    from PIL import Image

    for name, size, mode in [("png16_16mp", (4000, 4000), "I;16"), ("wide_16to1", (25296, 1581), "RGB"),
                             ("wide_10000x1", (10000, 1), "RGB")]:
        data, filename = bench_memory.make_upload(name)
        img = Image.open(BytesIO(data))
        assert (img.size, img.mode, filename) == (size, mode, "case.png")
    assert len(bench_memory.make_upload("png16_16mp")[0]) < 1_000_000  # a small file, a large canvas
