"""The command line (app.py at the repo root): the access flags, and the refusal to serve a
non-loopback address with no token unless the operator says so."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import insights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "cli-token-0123456789abcdef"
ACCESS_ENV = ("INSIGHTS_TOKENS", "INSIGHTS_TOKENS_FILE", "INSIGHTS_READ_ONLY", "INSIGHTS_PROXY_HOPS",
              "INSIGHTS_PUBLIC_URL")


def load_cli():
    spec = importlib.util.spec_from_file_location("insights_cli", os.path.join(ROOT, "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


class Started(Exception):
    """Raised by the stand-in create_app: main() got past its checks with this config."""


@pytest.fixture
def started(monkeypatch):
    """main() with create_app replaced: records the config instead of building an app."""
    for name in ACCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    seen = []

    def fake_create_app(config):
        seen.append(config)
        raise Started

    monkeypatch.setattr(insights, "create_app", fake_create_app)
    return seen


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost",
                                  "::ffff:127.0.0.1", " 127.0.0.1 "])
def test_loopback_addresses(host):
    assert cli.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "::ffff:10.0.0.1",
                                  "insights.example.com", "my-laptop", ""])
def test_other_addresses(host):
    assert not cli.is_loopback(host)


@pytest.mark.parametrize("host, tokens, read_only, public, refused", [
    ("0.0.0.0", 0, False, False, True),
    ("192.168.1.5", 0, False, False, True),
    ("0.0.0.0", 1, False, False, False),
    ("0.0.0.0", 0, True, False, False),
    ("0.0.0.0", 0, False, True, False),
    ("127.0.0.1", 0, False, False, False),
    ("localhost", 0, False, False, False),
])
def test_exposure_refusal(host, tokens, read_only, public, refused):
    why = cli.exposure_refusal(host, tokens=tokens, read_only=read_only, public_without_token=public)
    assert (why is not None) == refused
    if refused:
        assert why.startswith(f"refusing to serve {host} without an access token")
        assert "--public-without-token" in why and "--token" in why and "--read-only" in why


def test_access_flags_parse():
    args = cli.parse_args(["--token", "a" * 16, "--token", "b" * 16, "--tokens-file", "t.txt", "--read-only",
                           "--public-without-token"])
    assert args.token == ["a" * 16, "b" * 16] and args.tokens_file == "t.txt"
    assert args.read_only and args.public_without_token
    plain = cli.parse_args([])
    assert plain.token is None and plain.tokens_file is None and not plain.read_only
    assert not plain.public_without_token and plain.host == "127.0.0.1"


def test_public_address_without_token_is_refused_before_anything_starts(started, capsys):
    assert cli.main(["--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "insights: refusing to serve 0.0.0.0 without an access token" in err
    assert started == []  # no app was built, nothing listened


@pytest.mark.parametrize("argv, env, expect", [
    (["--token", TOKEN], {}, {"TOKENS": [TOKEN]}),
    (["--read-only"], {}, {"READ_ONLY": True}),
    ([], {"INSIGHTS_TOKENS": f"{TOKEN},{TOKEN[::-1]}"}, {}),
    ([], {"INSIGHTS_READ_ONLY": "true"}, {}),
    (["--public-without-token"], {}, {}),
])
def test_public_address_with_a_token_read_only_or_the_flag_goes_on(started, monkeypatch, capsys, argv, env, expect):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Started):
        cli.main(["--host", "0.0.0.0", "--port", "0", *argv])
    assert expect.items() <= started[0].items()
    err = capsys.readouterr().err
    assert ("anyone who reaches this address can use it" in err) == ("--public-without-token" in argv)


@pytest.mark.parametrize("env, words", [
    ({"INSIGHTS_PROXY_HOPS": "1"}, "PROXY_HOPS is 1"),
    ({"INSIGHTS_PUBLIC_URL": "https://insights.example.com"}, "PUBLIC_URL is https://insights.example.com"),
])
def test_loopback_behind_a_proxy_without_token_is_refused(started, monkeypatch, capsys, env, words):
    """Found in review: the refusal looked at --host only, and the usual deployment listens on
    127.0.0.1 behind a TLS proxy: with PROXY_HOPS or a public PUBLIC_URL and no token, anyone who
    reached the proxy could use it, and the command started without a word."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve 127.0.0.1 without an access token behind a proxy" in err and words in err
    assert started == []
    for argv in (["--token", TOKEN], ["--read-only"], ["--public-without-token"]):
        with pytest.raises(Started):
            cli.main(["--port", "0", *argv])
    assert ("anyone who reaches this address can use it" in capsys.readouterr().err)  # the flag's warning


@pytest.mark.parametrize("settings", [{}, {"PROXY_HOPS": 0}, {"PUBLIC_URL": "http://127.0.0.1:8000"},
                                      {"PUBLIC_URL": "http://localhost:8000/insights"}, {"PROXY_HOPS": "x"}])
def test_nothing_exposes_a_plain_loopback_server(settings):
    assert cli.exposed_through(settings) is None


def test_tokens_file_is_read_before_the_decision(started, tmp_path, capsys):
    path = tmp_path / "tokens"
    path.write_text("\n")  # an empty file gives no token: still refused
    assert cli.main(["--host", "0.0.0.0", "--tokens-file", str(path)]) == 2
    path.write_text(TOKEN + "\n")
    with pytest.raises(Started):
        cli.main(["--host", "0.0.0.0", "--tokens-file", str(path)])
    assert started[0]["TOKENS_FILE"] == str(path)


def test_a_short_token_stops_the_command_with_a_message(started, capsys):
    assert cli.main(["--token", "tooshort"]) == 2
    err = capsys.readouterr().err
    assert "insights: an access token from TOKENS has 8 characters; tokens need at least 16" in err
    assert "tooshort" not in err and started == []


@pytest.mark.parametrize("argv, env, words", [
    (["--threads", "6"], {}, "--threads 6 is not more than MAX_INLINE_WAITS (4) + MAX_EVENT_STREAMS (2) = 6"),
    (["--threads", "2"], {}, "Use --threads 8 or more, or lower those settings"),
    (["--threads", "8"], {"INSIGHTS_MAX_INLINE_WAITS": "6"}, "MAX_INLINE_WAITS (6) + MAX_EVENT_STREAMS (2) = 8"),
    ([], {"INSIGHTS_MAX_EVENT_STREAMS": "null"}, "MAX_EVENT_STREAMS is off (0 or null)"),
    ([], {"INSIGHTS_MAX_INLINE_WAITS": "0", "INSIGHTS_MAX_EVENT_STREAMS": "0"}, "MAX_INLINE_WAITS and MAX_EVENT_STREAMS are off"),
    ([], {"INSIGHTS_MAX_INLINE_WAITS": "many"}, "setting MAX_INLINE_WAITS must be a whole number, got 'many'"),
    (["--threads", "0"], {"INSIGHTS_MAX_INLINE_WAITS": "1"}, "--threads must be 1 or more, got 0"),
])
def test_too_few_threads_for_the_waits_and_streams_stop_the_command(started, monkeypatch, capsys, argv, env, words):
    """Found in review: with --threads at or below MAX_INLINE_WAITS + MAX_EVENT_STREAMS, waiting
    requests and event streams can hold every waitress thread and the page stops answering; the
    command started anyway. Now it stops first, saying why, with status 2."""
    for name in ("INSIGHTS_MAX_INLINE_WAITS", "INSIGHTS_MAX_EVENT_STREAMS"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("insights: ") and words in err, err
    assert started == []  # nothing was built


@pytest.mark.parametrize("argv, env", [
    ([], {}),  # the defaults: 8 > 4 + 2
    (["--threads", "7"], {}),
    (["--threads", "4"], {"INSIGHTS_MAX_INLINE_WAITS": "2", "INSIGHTS_MAX_EVENT_STREAMS": "1"}),
])
def test_enough_threads_go_on(started, monkeypatch, argv, env):
    for name in ("INSIGHTS_MAX_INLINE_WAITS", "INSIGHTS_MAX_EVENT_STREAMS"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Started):
        cli.main(["--port", "0", *argv])


def test_real_command_refuses_a_public_address_without_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ACCESS_ENV}
    proc = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--port", "0",
                           "--instance", str(tmp_path / "instance")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to serve 0.0.0.0 without an access token" in proc.stderr
    assert "Insights is serving" not in proc.stdout


def serve(tmp_path, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``python app.py --port 0 ARGS`` with no access settings from this environment (plus ``env``);
    the process and its "Insights is serving on ..." banner ("" when it printed none)."""
    environ = {**{k: v for k, v in os.environ.items() if k not in ACCESS_ENV}, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", "0", "--device", "cpu",
                             "--instance", str(tmp_path / "instance"), *args],
                            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(50):
        line = proc.stdout.readline()
        if not line or line.startswith("Insights is serving"):
            return proc, line
    return proc, ""


def test_real_server_with_a_token(tmp_path):
    """``python app.py --token T``: the API wants the token, the dashboard sends browsers to sign in,
    and a bearer gets through."""
    proc, banner = serve(tmp_path, ["--token", TOKEN])
    try:
        assert banner.startswith("Insights is serving on http://127.0.0.1:"), banner
        assert "access: 1 token)" in banner
        base = banner.split()[4].rstrip("/")

        def get(path, headers=None):
            req = urllib.request.Request(base + path, headers=headers or {})
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(req, timeout=30) as r:
                    return r.status, r.headers, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read()

        status, headers, body = get("/api/models")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["code"] == "unauthorized"
        status, _h, body = get("/api/models", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["models"]
        status, headers, _b = get("/")
        assert status == 303 and headers["Location"].startswith("/signin?next=")
        assert get("/signin")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_real_server_refuses_a_body_over_the_limit_before_reading_it(tmp_path):
    """python app.py gives waitress MAX_CONTENT_LENGTH as its max_request_body_size, so a longer
    body is refused by waitress from its Content-Length, in plain text, before it is read (the
    page checks a file's size first: tests/browser); one under the limit reaches the app."""
    import http.client

    proc, banner = serve(tmp_path, [], {"INSIGHTS_MAX_CONTENT_LENGTH": "3000", "INSIGHTS_BUILTIN_MODELS": "false",
                                        "INSIGHTS_MODELS_CONFIG": json.dumps([os.path.join(ROOT, "tests",
                                                                                           "tiny_models.py")])})
    try:
        port = int(banner.split()[4].rstrip("/").rsplit(":", 1)[1])
        answers = {}
        for size in (2900, 3001):
            head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            tail = b"\r\n--b--\r\n"
            body = head + b"x" * (size - len(head) - len(tail)) + tail
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/api/images", body=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
            r = conn.getresponse()
            answers[size] = (r.status, r.getheader("Content-Type"), r.read())
            conn.close()
        status, kind, data = answers[2900]  # read by the app: not an image
        assert status == 400 and kind == "application/json" and json.loads(data)["error"]["code"] == "bad_image"
        status, kind, data = answers[3001]
        assert status == 413 and kind.startswith("text/plain") and b"waitress" in data
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
