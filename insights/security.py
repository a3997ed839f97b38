"""Deploy settings and the headers every response carries.

``TRUSTED_HOSTS`` (Flask's own setting, parsed here from the environment's string), ``PROXY_HOPS``
(werkzeug's ProxyFix, so that ``X-Forwarded-*`` counts only from the proxies the operator names),
``FRAME_ANCESTORS`` (the Content-Security-Policy's ``frame-ancestors``), a request id for every
request (echoed as ``X-Request-Id`` and named in the logs and in every 500 answer), and the
security headers: a Content-Security-Policy that allows no inline script or style, nosniff, a
Referrer-Policy, and a 500 page that says nothing but the request id.
"""
from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from flask import Flask, current_app, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException, SecurityError
from werkzeug.middleware.proxy_fix import ProxyFix

from .errors import describe, new_request_id

REQUEST_ID_HEADER = "X-Request-Id"
# An incoming id is kept when it looks like an id (a proxy's UUID, a trace id), else a new one is
# made: it goes into log lines and headers, so nothing else may pass.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

# Everything the pages load comes from this server; the only images from elsewhere are data: URLs
# (the stylesheet's select arrow). Styles set through the DOM (element.style) are not inline styles.
CSP_BASE = ("default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
            "connect-src 'self'", "font-src 'self'", "object-src 'none'", "base-uri 'none'",
            "form-action 'self'")
# frame-ancestors values that X-Frame-Options can say too (for browsers that ignore the CSP's).
FRAME_OPTIONS = {"'none'": "DENY", "'self'": "SAMEORIGIN"}
SHARE_PREFIXES = ("/r/", "/api/results/")  # capability URLs: the referrer never carries them
# The path the app is served under (X-Forwarded-Prefix through ProxyFix): segments of plain URL
# path characters, each starting with "/", none empty. Anything else ("//evil.example", a URL, a
# port out of range) would go into every link the app makes, and some break making the answer.
SANE_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")


# --------------------------------------------------------------------------- settings


def parse_hosts(value) -> list[str] | None:
    """``TRUSTED_HOSTS`` as Flask wants it, a list, from a list or a comma-separated string (the
    environment's ``INSIGHTS_TRUSTED_HOSTS=a.example,b.example``; a JSON list arrives as a list).
    None or nothing in it: every host is answered."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = text.split(",")
    if not isinstance(value, (list, tuple, set)):
        raise ValueError(f"setting TRUSTED_HOSTS must be a list of host names or a comma-separated string, "
                         f"got {value!r}")
    hosts = [str(h).strip() for h in value if str(h).strip()]
    return hosts or None


def parse_public_url(value) -> str | None:
    """``PUBLIC_URL`` without its trailing slash: an http(s) address with a host, and a path
    when the app is served under one; no query or fragment. None or empty: not set."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment \
            or re.search(r"[\s\"'<>]", text):
        raise ValueError(f"setting PUBLIC_URL must be the http(s) address people reach the server at, "
                         f"e.g. https://insights.example.com, got {value!r}")
    return text


def parse_frame_ancestors(value) -> str:
    """``FRAME_ANCESTORS`` as the text of a CSP directive: sources separated by spaces (a list is
    joined). A ``;`` or a line break would start another directive or header, so it is refused."""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    text = str(value if value is not None else "'none'")
    if not text.strip() or re.search(r"[;,\x00-\x1f\x7f]", text):
        raise ValueError(f"setting FRAME_ANCESTORS must be CSP sources separated by spaces, e.g. \"'self' "
                         f"https://notebooks.example\", got {value!r}")
    return " ".join(text.split())


def proxy_hops(value) -> int:
    try:
        hops = int(value or 0)
    except (TypeError, ValueError):
        hops = -1
    if hops < 0 or isinstance(value, bool):
        raise ValueError(f"setting PROXY_HOPS must be a whole number of proxies (0 or more), got {value!r}")
    return hops


def content_security_policy(frame_ancestors: str) -> str:
    return "; ".join(CSP_BASE + (f"frame-ancestors {frame_ancestors}",))


# --------------------------------------------------------------------------- per request


def request_id() -> str | None:
    """This request's id: the client's ``X-Request-Id`` when it looks like one, else a new one;
    None outside a request."""
    if not has_request_context():
        return None
    rid = g.get("request_id")
    if rid is None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        rid = offered if SANE_REQUEST_ID.fullmatch(offered) else new_request_id()
        g.request_id = rid
    return rid


def _check_host():
    """A Host outside ``TRUSTED_HOSTS`` is a 400 before anything else runs (Flask finds it while
    routing; raising it here keeps it ahead of the other before-request checks)."""
    request_id()
    if isinstance(request.routing_exception, SecurityError):
        raise request.routing_exception


def _headers(resp):
    """The security headers and the request id, on every response."""
    settings = current_app.extensions["insights.security"]
    resp.headers["Content-Security-Policy"] = settings["csp"]
    resp.headers["X-Content-Type-Options"] = "nosniff"
    path = request.path
    share = any(path.startswith(p) for p in SHARE_PREFIXES)
    resp.headers["Referrer-Policy"] = "no-referrer" if share else "same-origin"
    if settings["frame_options"]:
        resp.headers["X-Frame-Options"] = settings["frame_options"]
    resp.headers[REQUEST_ID_HEADER] = request_id()
    return resp


def _internal_error(err: Exception):
    """An exception no view handled (the API has its own handler): logged with the request id,
    answered with nothing but that id."""
    if isinstance(err, HTTPException):  # not ours: the HTTP error handlers answer those
        return err
    answer = describe(err, request_id())
    if request.path == "/api" or request.path.startswith("/api/") or request.path == "/metrics":
        resp = jsonify({"error": answer.as_dict()})
    else:
        resp = current_app.response_class(answer.message + "\n", mimetype="text/plain")
    resp.status_code = answer.status
    if getattr(err, "retry_after", None):  # a page's 503 store_unavailable (the share page, say)
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def checked_prefix(wsgi_app):
    """The app behind ProxyFix, refusing a forwarded prefix that is not a plain path: the
    request keeps the prefix it had without one. (A proxy that does not set X-Forwarded-Prefix
    passes the client's own on, and ProxyFix takes it for the proxy's.)"""
    def app(environ, start_response):
        prefix = environ.get("SCRIPT_NAME", "")
        if prefix and not SANE_PREFIX.fullmatch(prefix):
            environ["SCRIPT_NAME"] = environ.get("werkzeug.proxy_fix.orig", {}).get("SCRIPT_NAME", "")
        return wsgi_app(environ, start_response)
    return app


# --------------------------------------------------------------------------- wiring


def init_app(app: Flask) -> None:
    """Parses the deploy settings and installs the proxy fix, the host check and the headers.
    Call it first in ``create_app`` so its checks run before the other before-request hooks."""
    app.config["TRUSTED_HOSTS"] = parse_hosts(app.config.get("TRUSTED_HOSTS"))
    app.config["PUBLIC_URL"] = parse_public_url(app.config.get("PUBLIC_URL"))
    ancestors = parse_frame_ancestors(app.config.get("FRAME_ANCESTORS"))
    app.config["FRAME_ANCESTORS"] = ancestors
    hops = app.config["PROXY_HOPS"] = proxy_hops(app.config.get("PROXY_HOPS"))
    app.extensions["insights.security"] = {"csp": content_security_policy(ancestors),
                                          "frame_options": FRAME_OPTIONS.get(ancestors)}
    if hops:
        app.wsgi_app = ProxyFix(checked_prefix(app.wsgi_app), x_for=hops, x_proto=hops, x_host=hops,
                                x_prefix=hops)
    app.before_request(_check_host)
    app.after_request(_headers)
    app.register_error_handler(Exception, _internal_error)
