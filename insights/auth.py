"""Access: access tokens (a bearer header or the sign-in page's cookie) and the read-only mirror.

With no tokens configured and ``READ_ONLY`` off, every request passes as before. With tokens, every
request needs one except the public paths below; share pages and the files of a result are
capability URLs (whoever holds the link may read it) and stay public. ``READ_ONLY`` serves the
public paths only. Access is decided by the request's path, before any view runs, so a view added
later needs a token until it is named here.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections import OrderedDict
from urllib.parse import urlsplit

from flask import (Blueprint, Flask, current_app, g, redirect, render_template, request,
                   url_for)

from . import metrics
from .admission import RateLimiter, address_id, limit
from .api import error_response
from .errors import retry_after_s

bp = Blueprint("auth", __name__)

COOKIE = "insights_access"
COOKIE_MAX_AGE = 30 * 24 * 3600  # a month: the cookie goes with the token it was made from anyway
MIN_TOKEN_LENGTH = 16
# The cookie holds HMAC-SHA256(token, SESSION_LABEL), never the token itself.
SESSION_LABEL = b"insights access cookie v1"
# A write signed in by cookie must carry this header. A cross-site form cannot set a header, and a
# cross-site script can only with a CORS preflight this server never grants.
CSRF_HEADER = "X-Requested-With"

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Readable by anyone (GET, HEAD): the capability URLs of a result, the page's static files, the
# colour tables the share page draws with, and liveness.
PUBLIC_READS = [re.compile(p) for p in (
    r"/r/[^/]+",  # a share page
    r"/api/results/[^/]+",  # a result's metadata
    r"/api/results/[^/]+/[^/]+",  # a result's files (input.png, map.png, overlay.png, attribution.npy)
    r"/static/.*",
    r"/api/colormaps/[^/]+",
    r"/healthz",
)]
SIGN_IN_PATHS = frozenset({"/signin", "/signout"})  # any method: signing in must not need a token
# Credentials one address may have refused a minute (SIGNIN_ATTEMPTS_PER_MIN): a wrong token in the
# form, a Bearer header or a cookie (a cookie is derived from a token, so it can test guesses too).
DEFAULT_ATTEMPTS_PER_MIN = 10
REFUSED_KEPT = 4096  # refused credentials remembered, so that repeating one costs no attempt


class AccessConfigError(ValueError):
    """The access settings cannot be served: a short token, an unreadable tokens file."""


# --------------------------------------------------------------------------- settings


def load_tokens(config) -> list[str]:
    """The access tokens from ``TOKENS`` (a list, or a comma-separated string) and ``TOKENS_FILE``
    (one per line; blank lines and lines starting with ``#`` are skipped), in that order, without
    repeats. A token shorter than 16 characters is refused with an :class:`AccessConfigError`."""
    raw = config.get("TOKENS")
    if raw is None:
        found = []
    elif isinstance(raw, (list, tuple, set)):
        found = [str(t) for t in raw]
    else:  # a string, or a number the environment's JSON parsing turned one into
        found = str(raw).split(",")
    sources = ["TOKENS"] * len(found)
    path = config.get("TOKENS_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise AccessConfigError(f"cannot read the tokens file {path}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip().startswith("#"):
                found.append(line)
                sources.append(f"{path}, line {n}")
    tokens: list[str] = []
    for token, source in zip(found, sources):
        token = token.strip()
        if not token:
            continue
        if len(token) < MIN_TOKEN_LENGTH:
            # Never echo a token, even a bad one: start-up output ends up in logs.
            raise AccessConfigError(
                f"an access token from {source} has {len(token)} characters; tokens need at least "
                f"{MIN_TOKEN_LENGTH} (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if token not in tokens:
            tokens.append(token)
    return tokens


def derive(token: str) -> str:
    """The value the cookie holds for ``token``: HMAC-SHA256 keyed by the token, in hex."""
    return hmac.new(token.encode("utf-8"), SESSION_LABEL, hashlib.sha256).hexdigest()


class Access:
    """The configured tokens (kept with their derived values) and the read-only switch."""

    def __init__(self, tokens: list[str], read_only: bool, attempts_per_min: int | None = DEFAULT_ATTEMPTS_PER_MIN):
        self.tokens = list(tokens)
        self._derived = [(derive(t), t) for t in self.tokens]
        self.read_only = bool(read_only)
        # Per address: a token bucket of wrong credentials.
        self.attempts = RateLimiter(attempts_per_min)
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def match(self, derived: str) -> str | None:
        """The token whose derived value is ``derived``, compared in constant time against every
        configured token (no early exit, so the time says nothing about which one or how close)."""
        found = None
        for value, token in self._derived:
            if hmac.compare_digest(value.encode("ascii"), derived.encode("utf-8", "replace")):
                found = token
        return found

    def check(self, token: str) -> str | None:
        """The configured token equal to ``token``, else None."""
        return self.match(derive(token)) if token else None

    def verify(self, kind: str, value: str, address: str) -> tuple[str | None, float]:
        """Checks a credential (``kind`` "token": a token as given; "cookie": a derived value)
        offered from ``address``: (the token, 0) when right; (None, 0) when wrong, counted
        against the address's attempts unless this very value was refused before (a stale cookie
        or a misconfigured script repeating itself learns nothing new); (None, seconds) when the
        address has no attempt left, without checking it: guesses past the limit are not tried,
        right or wrong, or the answer would tell them apart."""
        if not value:
            return None, 0.0
        key = hashlib.sha256(f"{kind}\0{value}".encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if key in self._refused:
                self._refused.move_to_end(key)
                return None, 0.0
        # Looked at, not taken: a right token costing an attempt would lock out busy clients
        # behind one address. Wrong guesses checked at once may pass the limit by the number of
        # server threads, no more.
        wait = self.attempts.wait(address)
        if wait > 0:
            return None, wait
        token = self.match(value) if kind == "cookie" else self.check(value)
        if token is not None:
            return token, 0.0
        self.attempts.take(address)
        with self._lock:
            self._refused[key] = None
            while len(self._refused) > REFUSED_KEPT:
                self._refused.popitem(last=False)
        return None, 0.0


def _access() -> Access:
    return current_app.extensions["insights.access"]


def flag(value) -> bool:
    """A boolean setting as it may come from the environment: true/1/yes, false/0/no/empty."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


# --------------------------------------------------------------------------- the gate


def is_public(path: str, method: str) -> bool:
    """Whether a request may pass without a token (and is served by a read-only mirror)."""
    if method not in SAFE_METHODS:
        return False
    return any(p.fullmatch(path) for p in PUBLIC_READS)


def _is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/") or path == "/metrics"


def _unauthorized(message: str, invalid: bool):
    resp = error_response(401, "unauthorized", message)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="insights"' + (', error="invalid_token"' if invalid else "")
    return resp


def address() -> str:
    """The client's address, as admission control names it (after ProxyFix, for PROXY_HOPS; an
    IPv6 address by its /64)."""
    return address_id(request.remote_addr)


def _busy(message: str, wait: float):
    """429 ``busy`` with ``Retry-After`` (a whole number of seconds, at least 1), counted in metrics."""
    metrics.count_rejection(current_app, "signin")
    resp = error_response(429, "busy", message)
    resp.headers["Retry-After"] = str(retry_after_s(wait))
    return resp


def _too_many(wait: float) -> str:
    return (f"too many wrong access tokens from your address: try again in {retry_after_s(wait)} s "
            f"(at most {_access().attempts.per_min} a minute, SIGNIN_ATTEMPTS_PER_MIN)")


def _identify(access: Access) -> tuple[str | None, str | None, bool, float]:
    """(token, how it came: "bearer" or "cookie", whether a credential was offered and refused,
    seconds until this address may have a credential checked again: > 0 when it was not checked)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":  # another scheme (a proxy's Basic auth) is not ours to judge
        kind, via, value = "token", "bearer", value.strip()
    else:
        kind, via, value = "cookie", "cookie", request.cookies.get(COOKIE)
        if not value:
            return None, None, False, 0.0
    token, wait = access.verify(kind, value, address())
    return (token, via, False, 0.0) if token else (None, None, True, wait)


def _gate():
    """Runs before every view: sets ``g.token`` (the matched token, or None) and ``g.access_via``,
    and answers 401, 403 or a redirect to the sign-in page where the request may not pass."""
    access = _access()
    g.token, g.access_via = None, None
    path, method = request.path, request.method
    if access.required:
        g.token, g.access_via, refused, locked = _identify(access)
    else:
        refused, locked = False, 0.0
    public = is_public(path, method)
    if access.read_only and not public:
        if method not in SAFE_METHODS:
            return error_response(403, "read_only", "this server is a read-only mirror: it serves share pages and "
                                                    "result files, and takes no uploads, explanations or changes")
        if _is_api(path):
            return error_response(403, "read_only", "this server is a read-only mirror: it serves share pages and "
                                                    "result files only")
        if path == "/signout":
            return None
        return render_template("readonly.html"), 403
    if not access.required or public or path in SIGN_IN_PATHS:
        return None
    if g.token is None:
        if locked and (method not in ("GET", "HEAD") or _is_api(path)):
            return _busy(_too_many(locked), locked)
        if method in ("GET", "HEAD") and not _is_api(path):  # the sign-in form says when it is locked
            target = request.full_path if request.query_string else request.path
            return redirect(url_for("auth.signin", next=target), 303)
        if refused:
            return _unauthorized("the access token is not valid; send Authorization: Bearer <token> "
                                 "with a token this server knows, or sign in again", True)
        return _unauthorized("this server needs an access token: send Authorization: Bearer <token>, "
                             "or sign in at /signin", False)
    if g.access_via == "cookie" and method not in SAFE_METHODS and not request.headers.get(CSRF_HEADER):
        return error_response(403, "csrf", f"a change made with the sign-in cookie must carry the header "
                                           f"{CSRF_HEADER} (the dashboard sends it); scripts send "
                                           "Authorization: Bearer <token>")
    return None


# --------------------------------------------------------------------------- sign-in page


def safe_next(target: str | None) -> str:
    """``target`` when it is a path on this server, else "/" (no redirect to another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 32 or ord(c) == 127 for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str | None) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) address, the default port filled in; None for anything
    else (``null``, a relative or malformed address)."""
    try:
        parts = urlsplit((url or "").strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host.lower(), port or DEFAULT_PORTS[scheme]


def own_origins() -> set:
    """The origins this server is reached at: the request's own (its Host, and what ProxyFix
    took from the trusted proxies' X-Forwarded-Proto and -Host) and ``PUBLIC_URL``'s."""
    found = {origin_of(request.host_url)}
    public = current_app.config.get("PUBLIC_URL")
    if public:
        found.add(origin_of(public))
    found.discard(None)
    return found


def _sent_origin() -> str | None:
    """The origin a browser says a form was posted from: ``Origin``, else ``Referer``."""
    return request.headers.get("Origin") or request.headers.get("Referer")


def over_https() -> bool:
    """Whether the browser is on https: the request came over it (ProxyFix applied), or the page
    that posted it says so (a TLS proxy whose X-Forwarded-Proto is not trusted, PROXY_HOPS 0, hides
    it from the request; the origin was checked to be this server's by :func:`cross_site`)."""
    origin = origin_of(_sent_origin())
    return request.is_secure or (origin is not None and origin[0] == "https")


def cross_site() -> bool:
    """Whether a form was posted from another site: its ``Origin`` (or, when a browser sent none,
    its ``Referer``) names an origin other than this server's. A request with neither (a script,
    an old browser) is not refused: the token it carries is its own."""
    sent = request.headers.get("Origin")
    if sent is None:
        sent = request.headers.get("Referer")
        if not sent:
            return False
    origin = origin_of(sent)
    return origin is None or origin not in own_origins()


CROSS_SITE = ("This sign-in was sent from another site, so it was refused: sign in from this server's own "
              "page. (Operators: behind a proxy, set PUBLIC_URL to the address people use, or PROXY_HOPS.)")


def _set_cookie(resp, token: str) -> None:
    resp.set_cookie(COOKIE, derive(token), max_age=COOKIE_MAX_AGE, path="/", httponly=True,
                    samesite="Lax", secure=over_https())


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    """The sign-in form; a right token sets the access cookie and goes on to ``next``."""
    access = _access()
    target = safe_next(request.values.get("next"))
    if not access.required:
        return redirect(target, 303)
    if request.method == "GET":
        if g.token is not None:
            return redirect(target, 303)
        return render_template("signin.html", next=target, error=None)
    if cross_site():  # login CSRF: another site signing this browser in with a token of its choosing
        return render_template("signin.html", next=target, error=CROSS_SITE), 403
    given = request.form.get("token", "").strip()
    if not given:
        return render_template("signin.html", next=target, error="Enter the access token you were given."), 401
    token, wait = access.verify("token", given, address())
    if wait:
        metrics.count_rejection(current_app, "signin")
        resp = current_app.make_response((render_template(
            "signin.html", next=target, error=f"Too many wrong tokens from your address. Try again in "
                                              f"{retry_after_s(wait)} s."), 429))
        resp.headers["Retry-After"] = str(retry_after_s(wait))
        return resp
    if token is None:
        error = "That token is not valid on this server. Check it and try again."
        return render_template("signin.html", next=target, error=error), 401
    resp = redirect(target, 303)
    _set_cookie(resp, token)
    return resp


@bp.post("/signout")
def signout():
    """Clears the access cookie and goes back to the sign-in page (or the dashboard when open);
    another site cannot sign a visitor out."""
    if cross_site():
        return error_response(403, "csrf", "a sign-out must come from this server's own page")
    resp = redirect(url_for("auth.signin") if _access().required else "/", 303)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Lax", secure=over_https())
    return resp


def init_app(app: Flask) -> None:
    """Reads the access settings (refusing a short token at start-up), registers the sign-in
    views and the gate. Call it before the other blueprints so that the gate runs first and
    ``g.token`` is set for every later ``before_request``."""
    access = Access(load_tokens(app.config), flag(app.config.get("READ_ONLY")),
                    limit(app.config.get("SIGNIN_ATTEMPTS_PER_MIN", DEFAULT_ATTEMPTS_PER_MIN)))
    app.extensions["insights.access"] = access
    app.register_blueprint(bp)
    app.before_request(_gate)

    @app.context_processor
    def _access_context():
        return {"access": {"required": access.required, "read_only": access.read_only,
                           "via": g.get("access_via")}}
