"""Access (insights/auth.py): tokens by bearer header or sign-in cookie, the public capability URLs,
CSRF for cookie writes, the read-only mirror, and the open app when no token is set."""
from __future__ import annotations

import hashlib
import hmac
import io
import re
import shutil
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import g, jsonify

from appkit import TINY_CONFIG, png, snapshot, upload
from insights.app import create_app
from insights.auth import COOKIE, AccessConfigError

TOKEN = "alpha-" + "a1b2c3d4e5f6a7b8"  # 22 characters
OTHER = "bravo-" + "0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
XRW = {"X-Requested-With": "insights"}

# Which routes answer without a token, written out here rather than imported from insights.auth,
# so that a change to the gate shows up as a failing test. Rules are matched as Flask spells them.
PUBLIC_RULES = [re.compile(p) for p in (
    r"/r/<[^>]+>",
    r"/api/results/<[^>]+>",
    r"/api/results/<[^>]+>/[^/<>]+",
    r"/static/<path:filename>",
    r"/api/colormaps/<[^>]+>\.png",
    r"/healthz",
)]
SIGN_IN_RULES = {"/signin", "/signout"}


def expected_public(rule: str, method: str) -> bool:
    return method == "GET" and any(p.fullmatch(rule) for p in PUBLIC_RULES)


def is_api(rule: str) -> bool:
    return rule == "/api" or rule.startswith("/api/") or rule == "/metrics"


def build(**settings):
    config = {"BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu"}
    config.update(settings)
    app = create_app(config)

    @app.get("/api/_whoami")  # test-only view: what the gate put in g for the views after it
    def whoami():
        return jsonify({"token": g.token, "via": g.access_via})

    return app


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An instance folder with one upload and one stored result, made while no token was set."""
    instance = str(tmp_path_factory.mktemp("made") / "instance")
    app = build(INSTANCE_PATH=instance)
    client = app.test_client()
    image = upload(client, png()).json["id"]
    answer = client.post("/api/explain", json={"image": image, "method": "saliency", "target": 1})
    assert answer.status_code == 200, answer.json
    app.extensions["insights"].jobs.shutdown()
    return {"instance": instance, "image": image, "result": answer.json["result"]["id"]}


@pytest.fixture
def stored(made, tmp_path):
    """A copy of that instance folder per test: a test that walks every route deletes what it can."""
    instance = str(tmp_path / "instance")
    shutil.copytree(made["instance"], instance)
    return {**made, "instance": instance}


@pytest.fixture
def locked(stored):
    app = build(INSTANCE_PATH=stored["instance"], TOKENS=[TOKEN, OTHER])
    yield app
    app.extensions["insights"].jobs.shutdown()


@pytest.fixture
def client(locked):
    return locked.test_client()


def sample_path(rule: str, stored: dict) -> str:
    """A concrete path for a rule: real ids where the public routes take them, so that they answer 200."""
    values = {"rid": stored["result"], "result_id": stored["result"], "image_id": stored["image"],
              "filename": "css/app.css", "job_id": "0" * 32}
    if rule.startswith("/api/colormaps/"):
        values["name"] = "viridis"
    elif rule.startswith("/api/models/"):
        values["name"] = "tiny"
    elif rule.startswith("/api/samples/"):
        values["name"] = "no-such-sample"

    def fill(m: re.Match) -> str:
        return values.get(m.group(2), "x")

    return re.sub(r"<(?:(\w+):)?(\w+)>", fill, rule)


def routes(app) -> list[tuple[str, str, str]]:
    """(rule, method, path) for every route and method of the app; deletions last, since a
    deletion may remove what a later request reads."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.rule == "/api/_whoami":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.rule, method, sample_path(rule.rule, app.config["_stored"])))
    return sorted(out, key=lambda r: (r[1] == "DELETE", r[0], r[1]))


def sign_in_next(resp) -> str | None:
    """The page a redirect to the sign-in page will come back to, or None for another redirect."""
    where = urlsplit(resp.headers.get("Location", ""))
    if where.path != "/signin":
        return None
    return parse_qs(where.query).get("next", [None])[0]


def send(client, method: str, path: str, headers=None):
    return client.open(path, method=method, headers=headers or {})


# --------------------------------------------------------------------------- every route


def test_every_route_needs_a_token_unless_it_is_a_capability_url(locked, client, stored):
    locked.config["_stored"] = stored
    table = routes(locked)
    rules = {r for r, _m, _p in table}
    assert {"/", "/api", "/api/explain", "/api/images", "/api/images/<image_id>", "/api/models", "/r/<result_id>",
            "/api/results/<rid>", "/api/results/<rid>/overlay.png", "/signin"} <= rules
    wrong = []
    for rule, method, path in table:
        r = send(client, method, path)
        if rule in SIGN_IN_RULES:
            ok = "WWW-Authenticate" not in r.headers and r.mimetype == "text/html" if r.status_code != 303 \
                else not r.headers["Location"].startswith("/api")
        elif expected_public(rule, method):
            ok = r.status_code == 200  # real ids: the public routes answer in full
        elif is_api(rule) or method != "GET":
            ok = (r.status_code == 401 and r.json["error"] == {"code": "unauthorized", "field": None,
                                                               "message": r.json["error"]["message"]}
                  and r.headers["WWW-Authenticate"].startswith("Bearer"))
        else:  # a page: the browser is sent to sign in, and comes back here after
            ok = r.status_code == 303 and sign_in_next(r) == path
        if not ok:
            wrong.append(f"{method} {rule} (no token) -> {r.status_code} {r.headers.get('Location', '')}")
    assert not wrong, "\n".join(wrong)


def test_every_route_passes_with_a_bearer_token(locked, client, stored):
    locked.config["_stored"] = stored
    wrong = []
    for rule, method, path in routes(locked):
        if rule in SIGN_IN_RULES:  # the form itself, tested on its own below
            continue
        r = send(client, method, path, {"Authorization": f"Bearer {OTHER}"})
        if r.status_code in (401, 403) or r.headers.get("Location", "").startswith("/signin"):
            wrong.append(f"{method} {rule} (bearer) -> {r.status_code}")
        if method == "GET" and rule in ("/", "/api", "/api/models", "/api/images/<image_id>"):
            assert r.status_code == 200, rule
    assert not wrong, "\n".join(wrong)


def test_without_tokens_everything_is_open_as_before(stored):
    app = build(INSTANCE_PATH=stored["instance"])
    app.config["_stored"] = stored
    client = app.test_client()
    try:
        for rule, method, path in routes(app):
            r = send(client, method, path)
            assert r.status_code not in (401, 403), f"{method} {rule} -> {r.status_code}"
            assert not r.headers.get("Location", "").startswith("/signin"), rule
        page = client.get("/")
        assert page.status_code == 200 and b'id="signout"' not in page.data
        assert client.get("/signin?next=/r/x").headers["Location"] == "/r/x"  # nothing to sign in to
        assert upload(client, png(color=(1, 2, 3))).status_code == 201  # no header needed either
        assert client.get("/api/_whoami").json == {"token": None, "via": None}
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_unknown_paths_are_gated_too(client):
    assert client.get("/api/no-such-thing").status_code == 401
    assert sign_in_next(client.get("/no-such-page")) == "/no-such-page"
    assert client.get("/no-such-page", headers=BEARER).status_code == 404


# --------------------------------------------------------------------------- bearer


def test_bearer_token_is_checked_and_names_the_client(client):
    assert client.get("/api/_whoami", headers=BEARER).json == {"token": TOKEN, "via": "bearer"}
    assert client.get("/api/_whoami", headers={"Authorization": f"bearer  {OTHER} "}).json["token"] == OTHER
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Bearer {TOKEN.upper()}"):
        r = client.get("/api/models", headers={"Authorization": header})
        assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="insights", error="invalid_token"'
        assert "not valid" in r.json["error"]["message"]
    missing = client.get("/api/models")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="insights"'
    assert "Authorization: Bearer" in missing.json["error"]["message"]
    # Another scheme (a proxy's Basic auth passed through) is not a token.
    assert client.get("/api/models", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_writes_with_a_bearer_need_no_csrf_header(client):
    assert upload(client, png(color=(9, 9, 9))).status_code == 401
    r = client.post("/api/images", headers=BEARER, data={"image": (io.BytesIO(png(color=(9, 9, 9))), "p.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 201
    r = client.post("/api/predict", headers=BEARER, json={"image": r.json["id"]})
    assert r.status_code == 200 and len(r.json["predictions"]) == 5


# --------------------------------------------------------------------------- sign-in cookie


def set_cookie_header(resp) -> str:
    [header] = [v for k, v in resp.headers.items() if k == "Set-Cookie" and v.startswith(COOKIE + "=")]
    return header


def test_cookie_flow_sign_in_use_write_and_sign_out(locked, client, stored):
    r = client.get("/")
    assert r.status_code == 303 and sign_in_next(r) == "/"
    form = client.get(r.headers["Location"])
    assert form.status_code == 200
    assert b'type="password"' in form.data and b'<label class="field-label" for="token">' in form.data
    assert b'name="next" value="/"' in form.data

    wrong = client.post("/signin", data={"token": OTHER + "0", "next": "/"})
    assert wrong.status_code == 401 and "Set-Cookie" not in wrong.headers
    assert b"not valid on this server" in wrong.data and b'role="alert"' in wrong.data
    assert b'type="password"' in wrong.data  # the form again, with the message
    empty = client.post("/signin", data={"token": "  ", "next": "/"})
    assert empty.status_code == 401 and b"Enter the access token" in empty.data

    ok = client.post("/signin", data={"token": f" {TOKEN} ", "next": "/"})
    assert ok.status_code == 303 and ok.headers["Location"] == "/"
    header = set_cookie_header(ok)
    attrs = [a.strip().lower() for a in header.split(";")]
    assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # plain http: a Secure cookie would never come back
    value = header.split(";")[0].split("=", 1)[1]
    assert TOKEN not in header and value == hmac.new(TOKEN.encode(), b"insights access cookie v1",
                                                     hashlib.sha256).hexdigest()

    page = client.get("/")
    assert page.status_code == 200 and b'id="signout"' in page.data
    assert client.get("/api/_whoami").json == {"token": TOKEN, "via": "cookie"}
    assert client.get("/api/models").status_code == 200
    assert client.get(f"/api/images/{stored['image']}").status_code == 200

    # A write by cookie needs the header the page sends; without it, nothing is written.
    before = snapshot(stored["instance"])
    bare = upload(client, png(color=(40, 50, 60)))
    assert bare.status_code == 403 and bare.json["error"]["code"] == "csrf"
    assert "X-Requested-With" in bare.json["error"]["message"]
    assert snapshot(stored["instance"]) == before
    assert client.delete("/api/jobs/" + "0" * 32).status_code == 403
    made = client.post("/api/images", headers=XRW, content_type="multipart/form-data",
                       data={"image": (io.BytesIO(png(color=(40, 50, 60))), "p.png")})
    assert made.status_code == 201
    assert client.post("/api/predict", headers=XRW, json={"image": made.json["id"]}).status_code == 200
    assert client.delete("/api/jobs/" + "0" * 32, headers=XRW).status_code == 404  # through the gate

    out = client.post("/signout")
    assert out.status_code == 303 and out.headers["Location"] == "/signin"
    cleared = set_cookie_header(out)
    assert "Max-Age=0" in cleared or "expires=Thu, 01 Jan 1970" in cleared
    assert client.get("/").status_code == 303
    assert client.get("/api/models").status_code == 401


def test_cookie_is_secure_over_https(client):
    ok = client.post("/signin", data={"token": TOKEN}, base_url="https://insights.example")
    attrs = [a.strip().lower() for a in set_cookie_header(ok).split(";")]
    assert ok.status_code == 303 and "secure" in attrs and "httponly" in attrs and "samesite=lax" in attrs


def test_cookie_is_secure_when_the_browser_is_on_https_behind_an_untrusted_proxy(stored):
    """Found in review: behind a TLS proxy with PROXY_HOPS 0 (its X-Forwarded-Proto not trusted) the
    cookie went without Secure, so a later plain-http request (an http:// link, the proxy's own
    redirect to https) would carry it in clear. The browser's Origin says it is on https."""
    app = build(INSTANCE_PATH=stored["instance"], TOKENS=[TOKEN], PUBLIC_URL="https://insights.example.com")
    client = app.test_client()
    try:
        ok = client.post("/signin", data={"token": TOKEN}, headers={"Origin": "https://insights.example.com"})
        assert ok.status_code == 303 and "secure" in [a.strip().lower() for a in set_cookie_header(ok).split(";")]
        out = client.post("/signout", headers={"Referer": "https://insights.example.com/"})
        assert "secure" in [a.strip().lower() for a in set_cookie_header(out).split(";")]
        plain = client.post("/signin", data={"token": TOKEN})  # no header: the request's own scheme
        assert "secure" not in [a.strip().lower() for a in set_cookie_header(plain).split(";")]
        local = client.post("/signin", data={"token": TOKEN}, headers={"Origin": "http://localhost"})
        assert "secure" not in [a.strip().lower() for a in set_cookie_header(local).split(";")]
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_a_forged_or_raw_token_cookie_is_refused(client):
    for value in (TOKEN, "0" * 64, hashlib.sha256(TOKEN.encode()).hexdigest(), "é" * 10):
        client.set_cookie(COOKIE, value)
        r = client.get("/api/models")
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"], value
        assert client.get("/").status_code == 303


def test_a_removed_token_ends_its_cookies(stored):
    first = build(INSTANCE_PATH=stored["instance"], TOKENS=[TOKEN, OTHER])
    c = first.test_client()
    c.post("/signin", data={"token": OTHER})
    assert c.get("/").status_code == 200
    later = build(INSTANCE_PATH=stored["instance"], TOKENS=TOKEN)  # OTHER revoked by a restart
    c2 = later.test_client()
    c2.set_cookie(COOKIE, c.get_cookie(COOKIE).value)
    assert c2.get("/").status_code == 303
    for app in (first, later):
        app.extensions["insights"].jobs.shutdown()


@pytest.mark.parametrize("target, lands", [
    ("/", "/"),
    ("/r/abc?mode=heat_map", "/r/abc?mode=heat_map"),
    ("https://evil.example/", "/"),
    ("//evil.example/x", "/"),
    ("/\\evil.example", "/"),
    ("javascript:alert(1)", "/"),
    ("/\t/evil.example", "/"),
    ("evil.example", "/"),
    ("", "/"),
])
def test_sign_in_goes_only_to_local_paths(client, target, lands):
    r = client.post("/signin", data={"token": TOKEN, "next": target})
    assert r.status_code == 303 and r.headers["Location"] == lands
    assert "next" not in r.headers["Location"]


def test_the_page_comes_back_where_it_was_asked_for(client):
    r = client.get("/?image=abc")
    assert r.status_code == 303
    nxt = sign_in_next(r)
    assert nxt == "/?image=abc"
    assert client.post("/signin", data={"token": TOKEN, "next": nxt}).headers["Location"] == "/?image=abc"
    assert client.get("/signin?next=/api").headers["Location"] == "/api"  # signed in: straight on


def test_bearer_page_view_has_no_sign_out_button(client):
    page = client.get("/", headers=BEARER)
    assert page.status_code == 200 and b'id="signout"' not in page.data


# --------------------------------------------------------------------------- settings


def test_tokens_from_a_file_the_environment_and_a_list(stored, tmp_path, monkeypatch):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# team tokens\n\n  {OTHER}  \n\n{TOKEN}\n")
    monkeypatch.setenv("INSIGHTS_TOKENS", " charlie-0123456789abcd , ")
    app = build(INSTANCE_PATH=stored["instance"], TOKENS_FILE=str(path))
    try:
        tokens = app.extensions["insights.access"].tokens
        assert tokens == ["charlie-0123456789abcd", OTHER, TOKEN]
        c = app.test_client()
        for t in tokens:
            assert c.get("/api/_whoami", headers={"Authorization": f"Bearer {t}"}).json["token"] == t
        assert c.get("/api/_whoami", headers={"Authorization": "Bearer # team tokens"}).status_code == 401
    finally:
        app.extensions["insights"].jobs.shutdown()


@pytest.mark.parametrize("settings, words", [
    ({"TOKENS": [TOKEN, "short-token"]}, "an access token from TOKENS has 11 characters; tokens need at least 16"),
    ({"TOKENS": f"{TOKEN},tiny"}, "has 4 characters"),
    ({"TOKENS_FILE": "/nowhere/tokens.txt"}, "cannot read the tokens file /nowhere/tokens.txt"),
])
def test_bad_tokens_are_refused_at_start_up(stored, settings, words):
    with pytest.raises(AccessConfigError) as err:
        build(INSTANCE_PATH=stored["instance"], **settings)
    assert words in str(err.value)
    assert "short-token" not in str(err.value) and "tiny" not in str(err.value)  # never echoed


def test_a_short_token_in_a_file_names_its_line(stored, tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKEN}\n\nabc\n")
    with pytest.raises(AccessConfigError, match=r"tokens.txt, line 3 has 3 characters"):
        build(INSTANCE_PATH=stored["instance"], TOKENS_FILE=str(path))


# --------------------------------------------------------------------------- read-only mirror


@pytest.mark.parametrize("tokens", [None, [TOKEN]])
def test_read_only_serves_share_pages_and_refuses_every_write(stored, tokens):
    app = build(INSTANCE_PATH=stored["instance"], READ_ONLY=True, TOKENS=tokens)
    app.config["_stored"] = stored
    client = app.test_client()
    headers = BEARER if tokens else {}
    try:
        before = snapshot(stored["instance"])
        writes = [(rule, m, p) for rule, m, p in routes(app) if m not in ("GET",)
                  and rule not in SIGN_IN_RULES]
        assert {("/api/images", "POST"), ("/api/explain", "POST"), ("/api/jobs/<job_id>", "DELETE")} <= \
            {(rule, m) for rule, m, _p in writes}
        for rule, method, path in writes:
            for h in (headers, {**headers, **XRW}):
                r = send(client, method, path, h)
                assert r.status_code == 403 and r.json["error"]["code"] == "read_only", (method, rule)
                assert "read-only mirror" in r.json["error"]["message"]
        assert snapshot(stored["instance"]) == before
        rid = stored["result"]
        for path in (f"/r/{rid}", f"/api/results/{rid}", f"/api/results/{rid}/overlay.png",
                     f"/api/results/{rid}/attribution.npy", "/static/css/app.css", "/api/colormaps/viridis.png"):
            assert client.get(path).status_code == 200, path  # no token needed, even when tokens are set
        assert b"Open the dashboard" not in client.get(f"/r/{rid}").data  # the mirror has none to open
        page = client.get("/", headers=headers)
        assert page.status_code == 403 and page.mimetype == "text/html"
        assert b"A read-only mirror" in page.data and b'class="topbar"' in page.data
        for path in ("/api/models", f"/api/images/{stored['image']}", "/api"):
            r = client.get(path, headers=headers)
            assert r.status_code == 403 and r.json["error"]["code"] == "read_only", path
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_read_only_from_the_environment(stored, monkeypatch):
    monkeypatch.setenv("INSIGHTS_READ_ONLY", "1")
    app = build(INSTANCE_PATH=stored["instance"])
    assert app.test_client().post("/api/predict", json={}).json["error"]["code"] == "read_only"
    app.extensions["insights"].jobs.shutdown()
    monkeypatch.setenv("INSIGHTS_READ_ONLY", "false")
    app = build(INSTANCE_PATH=stored["instance"])
    assert app.test_client().post("/api/predict", json={}).json["error"]["code"] == "bad_request"
    app.extensions["insights"].jobs.shutdown()


# --------------------------------------------------------------------------- guessing tokens


def wrong(n: int) -> str:
    return f"wrong-guess-{n:08d}-xxxx"


def test_wrong_tokens_from_one_address_are_limited_then_refused_unchecked(stored):
    """Found in review: the form (and the Bearer header) took any number of guesses. Now each
    address may have SIGNIN_ATTEMPTS_PER_MIN wrong tokens checked a minute; past that nothing it
    sends is checked, right or wrong (else the answer would tell them apart), and it gets 429."""
    app = build(INSTANCE_PATH=stored["instance"], TOKENS=[TOKEN], SIGNIN_ATTEMPTS_PER_MIN=3)
    now = [1000.0]
    app.extensions["insights.access"].attempts.clock = lambda: now[0]
    client = app.test_client()
    there = {"REMOTE_ADDR": "203.0.113.7"}
    try:
        for _ in range(5):  # right tokens cost nothing
            assert client.get("/api/models", headers=BEARER).status_code == 200
        assert client.post("/signin", data={"token": wrong(1)}).status_code == 401
        assert client.get("/api/models", headers={"Authorization": f"Bearer {wrong(2)}"}).status_code == 401
        client.set_cookie(COOKIE, hmac.new(wrong(3).encode(), b"insights access cookie v1", hashlib.sha256).hexdigest())
        assert client.get("/api/models").status_code == 401  # a derived cookie tries a guess too
        client.delete_cookie(COOKIE)
        for _ in range(3):  # a refused value again (a stale cookie, a script retrying) is no new guess
            assert client.post("/signin", data={"token": wrong(1)}).status_code == 401

        form = client.post("/signin", data={"token": TOKEN, "next": "/"})  # even the right one now
        assert form.status_code == 429 and "Set-Cookie" not in form.headers
        assert form.mimetype == "text/html" and b"Too many wrong tokens" in form.data
        wait = form.headers["Retry-After"]
        assert wait.isdigit() and 1 <= int(wait) <= 20  # one attempt comes back every 60/3 s
        api = client.get("/api/models", headers=BEARER)
        assert api.status_code == 429 and api.json["error"]["code"] == "busy"
        assert api.headers["Retry-After"].isdigit() and int(api.headers["Retry-After"]) >= 1
        assert "SIGNIN_ATTEMPTS_PER_MIN" in api.json["error"]["message"]
        write = client.post("/api/predict", headers={"Authorization": f"Bearer {wrong(4)}"}, json={})
        assert write.status_code == 429 and write.json["error"]["code"] == "busy"
        page = client.get("/", headers=BEARER)  # a page goes to the form, which says it is locked
        assert page.status_code == 303 and sign_in_next(page) == "/"
        assert client.get(f"/r/{stored['result']}", headers=BEARER).status_code == 200  # public stays public

        # Another address is not held back by this one.
        assert client.get("/api/models", headers=BEARER, environ_base=there).status_code == 200
        assert client.post("/signin", data={"token": wrong(5)}, environ_base=there).status_code == 401

        now[0] += 20.0  # one attempt back
        assert client.post("/signin", data={"token": TOKEN, "next": "/"}).status_code == 303
        assert client.get("/api/models", headers=BEARER).status_code == 200
        scraped = client.get("/metrics", headers=BEARER).get_data(as_text=True)
        assert 'insights_rejections_total{reason="signin"} 3.0' in scraped
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_guesses_behind_a_trusted_proxy_count_per_forwarded_address(stored):
    app = build(INSTANCE_PATH=stored["instance"], TOKENS=[TOKEN], SIGNIN_ATTEMPTS_PER_MIN=2, PROXY_HOPS=1)
    client = app.test_client()
    try:
        for n in range(2):
            headers = {"X-Forwarded-For": "198.51.100.1", "Authorization": f"Bearer {wrong(n)}"}
            assert client.get("/api/models", headers=headers).status_code == 401
        assert client.get("/api/models", headers={"X-Forwarded-For": "198.51.100.1", **BEARER}).status_code == 429
        assert client.get("/api/models", headers={"X-Forwarded-For": "198.51.100.2", **BEARER}).status_code == 200
    finally:
        app.extensions["insights"].jobs.shutdown()


# --------------------------------------------------------------------------- login CSRF


@pytest.mark.parametrize("headers, ok", [
    ({}, True),  # a script or an old browser: nothing to judge by
    ({"Origin": "http://localhost"}, True),
    ({"Origin": "http://localhost:80"}, True),
    ({"Origin": "HTTP://LocalHost"}, True),
    ({"Referer": "http://localhost/signin?next=/"}, True),
    ({"Origin": "https://evil.example"}, False),
    ({"Origin": "http://localhost:8001"}, False),
    ({"Origin": "https://localhost"}, False),
    ({"Origin": "null"}, False),  # a sandboxed frame or a data: page
    ({"Origin": "http://localhost.evil.example"}, False),
    ({"Origin": "http://localhost:x"}, False),
    ({"Referer": "https://evil.example/login.html"}, False),
    ({"Origin": "https://evil.example", "Referer": "http://localhost/signin"}, False),
])
def test_a_sign_in_posted_from_another_site_is_refused(client, headers, ok):
    """Found in review: any page could post the form with the attacker's token and sign the
    visitor in as the attacker (login CSRF; SameSite does not stop a top-level POST)."""
    r = client.post("/signin", data={"token": TOKEN, "next": "/"}, headers=headers)
    if ok:
        assert r.status_code == 303 and COOKIE in r.headers.get("Set-Cookie", "")
    else:
        assert r.status_code == 403 and "Set-Cookie" not in r.headers
        assert b"sent from another site" in r.data and b'type="password"' in r.data


def test_sign_in_origin_follows_public_url_and_trusted_proxies(stored):
    team = {"Origin": "https://insights.example.com"}
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "insights.example.com",
                 "X-Forwarded-For": "198.51.100.9"}
    cases = [({"PUBLIC_URL": "https://insights.example.com/"}, {}, True),
             ({"PUBLIC_URL": "https://insights.example.com:443"}, {}, True),
             ({"PROXY_HOPS": 1}, forwarded, True),
             ({}, forwarded, False)]  # X-Forwarded-* from no trusted proxy names no origin
    for settings, extra, ok in cases:
        app = build(INSTANCE_PATH=stored["instance"], TOKENS=[TOKEN], **settings)
        try:
            r = app.test_client().post("/signin", data={"token": TOKEN}, headers={**team, **extra})
            assert r.status_code == (303 if ok else 403), settings
            if settings.get("PROXY_HOPS"):
                assert "secure" in set_cookie_header(r).lower()
        finally:
            app.extensions["insights"].jobs.shutdown()


def test_sign_out_from_another_site_is_refused(client):
    assert client.post("/signin", data={"token": TOKEN}).status_code == 303
    r = client.post("/signout", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json["error"]["code"] == "csrf" and "Set-Cookie" not in r.headers
    assert client.get("/").status_code == 200  # still signed in
    assert client.post("/signout", headers={"Origin": "http://localhost"}).status_code == 303
    assert client.get("/").status_code == 303
