"""The server benchmark runs end to end against the real server and reports both runs."""
import threading

from insights import bench_server


def test_bench_server_reports_both_runs(capsys):
    before = set(threading.enumerate())
    out = bench_server.main(["--requests", "4", "--clients", "2"])
    # The server's loop and the compute worker have ended, without an error printed.
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []
    assert out["one"]["requests"] == 4 and out["many"]["requests"] == 4
    assert out["one"]["mean_batch"] == 1.0  # one client never has company
    assert out["ratio"] == out["many"]["throughput_rps"] / out["one"]["throughput_rps"]
    printed = capsys.readouterr()  # read once: a second read would find nothing left
    assert "1 client" in printed.out and "2 concurrent clients" in printed.out
    assert "throughput ratio" in printed.out
    assert "Traceback" not in printed.err


def test_photos_are_distinct():
    pics = bench_server.photos(8)
    assert len(set(pics)) == 8
