"""Serve the Insights dashboard: ``python app.py [--host H] [--port P] [--device auto] ...``."""
from __future__ import annotations

import argparse
import ipaddress
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve the Insights dashboard and JSON API with waitress.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.py",
                   help="Python file that registers models with register(...); may be repeated")
    p.add_argument("--torchscript", metavar="MODEL.pt", help="a TorchScript classifier to serve")
    p.add_argument("--exported", metavar="MODEL.pt2", help="a torch.export program (torch.export.save) to serve")
    p.add_argument("--labels", metavar="LABELS.txt", help="class names of --torchscript or --exported, one per line")
    p.add_argument("--instance", metavar="DIR", help="folder for uploads, results and the index (default ./instance)")
    p.add_argument("--threads", type=int, default=8, help="waitress request threads (default 8)")
    access = p.add_argument_group("access (docs/api.md, Access)")
    access.add_argument("--token", action="append", default=None, metavar="TOKEN",
                        help="an access token (16 characters or more); may be repeated; replaces INSIGHTS_TOKENS. "
                             "Prefer --tokens-file: a command line is visible to other users of the machine")
    access.add_argument("--tokens-file", metavar="FILE", help="a file of access tokens, one per line")
    access.add_argument("--read-only", action="store_true",
                        help="serve only share pages and result files; every write answers 403")
    access.add_argument("--public-without-token", action="store_true",
                        help="serve a non-loopback address with no token: anyone who reaches it can use it "
                             "(a public demo; the admission limits still hold)")
    args = p.parse_args(argv)
    if args.torchscript and args.exported:
        p.error("serve either --torchscript or --exported, not both")
    if bool(args.torchscript or args.exported) != bool(args.labels):
        p.error("--torchscript and --labels go together (as do --exported and --labels)")
    return args


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: 127.0.0.0/8, ::1 or localhost."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # another host name: it may resolve to any address
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def exposed_through(settings: dict) -> str | None:
    """What says a loopback server is reached from elsewhere anyway: proxies in front
    (``PROXY_HOPS``), or a ``PUBLIC_URL`` whose host is not loopback; None when nothing does."""
    from urllib.parse import urlsplit

    try:
        hops = int(settings.get("PROXY_HOPS") or 0)
    except (TypeError, ValueError):
        hops = 0  # create_app refuses it with its own message
    if hops > 0:
        return f"PROXY_HOPS is {hops}: proxies in front pass other machines' requests to it"
    public = settings.get("PUBLIC_URL")
    if public:
        try:
            host = urlsplit(str(public).strip()).hostname
        except ValueError:
            host = None
        if host and not is_loopback(host):
            return f"PUBLIC_URL is {str(public).strip()}: people reach it there"
    return None


def exposure_refusal(host: str, *, tokens: int, read_only: bool, public_without_token: bool,
                     exposed: str | None = None) -> str | None:
    """Why serving ``host`` this way is refused (None when it is not): a non-loopback address, or a
    loopback one behind a proxy (``exposed`` says why), with no token lets anyone who reaches it
    upload images and run the models, unless the mirror is read-only or the operator said so with
    --public-without-token."""
    if tokens or read_only or public_without_token or (is_loopback(host) and not exposed):
        return None
    if is_loopback(host):
        return (f"refusing to serve {host} without an access token behind a proxy ({exposed}): anyone who "
                "reaches the proxy could upload images and run the models. Give a token (--token, --tokens-file "
                "or INSIGHTS_TOKENS), serve a read-only mirror (--read-only), or pass --public-without-token if an "
                "open instance is what you mean (a public demo; the admission limits still hold).")
    return (f"refusing to serve {host} without an access token: anyone who can reach this address could "
            "upload images and run the models. Give a token (--token, --tokens-file or INSIGHTS_TOKENS), "
            "serve a read-only mirror (--read-only), listen on 127.0.0.1, or pass --public-without-token "
            "if an open instance is what you mean (a public demo; the admission limits still hold).")


def threads_refusal(threads: int, settings: dict) -> str | None:
    """Why ``threads`` waitress threads cannot serve these settings (None when they can): inline
    waits (``MAX_INLINE_WAITS``) and event streams (``MAX_EVENT_STREAMS``) may each hold a thread
    for seconds to a minute, so at least one must be left over for the cheap requests (the page,
    models, share pages, job states); a limit of 0 or null is no limit, which nothing leaves over."""
    from insights.admission import limit

    held = {}
    for name in ("MAX_INLINE_WAITS", "MAX_EVENT_STREAMS"):
        try:
            held[name] = limit(settings.get(name))
        except (TypeError, ValueError):
            return f"setting {name} must be a whole number, got {settings.get(name)!r}"
    if threads < 1:
        return f"--threads must be 1 or more, got {threads}"
    unlimited = [name for name, n in held.items() if n is None]
    if unlimited:
        return (f"{' and '.join(unlimited)} {'is' if len(unlimited) == 1 else 'are'} off (0 or null), so "
                f"waiting requests and event streams could hold all {threads} server threads and the page, "
                "the share pages and job states would stop answering; give each a number whose sum is "
                "below --threads")
    total = sum(held.values())
    if threads <= total:
        return (f"--threads {threads} is not more than MAX_INLINE_WAITS ({held['MAX_INLINE_WAITS']}) + "
                f"MAX_EVENT_STREAMS ({held['MAX_EVENT_STREAMS']}) = {total}: waiting requests and event streams "
                "could hold every server thread and cheap requests (the page, share pages, job states) would "
                f"stop answering. Use --threads {total + 2} or more, or lower those settings.")
    return None


def main(argv: list[str] | None = None) -> int | None:
    args = parse_args(argv)
    from waitress import create_server

    from insights import create_app
    from insights.app import DEFAULTS, env_settings
    from insights.auth import AccessConfigError, flag, load_tokens

    config: dict = {}
    if args.device:
        config["DEVICE"] = args.device
    if args.config:
        config["MODELS_CONFIG"] = args.config
    if args.torchscript:
        config["TORCHSCRIPT"], config["TORCHSCRIPT_LABELS"] = args.torchscript, args.labels
    if args.exported:
        config["EXPORTED"], config["EXPORTED_LABELS"] = args.exported, args.labels
    if args.instance:
        config["INSTANCE_PATH"] = args.instance
    if args.token is not None:
        config["TOKENS"] = args.token
    if args.tokens_file:
        config["TOKENS_FILE"] = args.tokens_file
    if args.read_only:
        config["READ_ONLY"] = True
    # The access settings are checked before anything starts, with the environment's too.
    settings = {**DEFAULTS, **env_settings(), **config}
    try:
        tokens = load_tokens(settings)
    except AccessConfigError as e:
        print(f"insights: {e}", file=sys.stderr)
        return 2
    why = threads_refusal(args.threads, settings)
    if why:
        print(f"insights: {why}", file=sys.stderr)
        return 2
    read_only = flag(settings.get("READ_ONLY"))
    exposed = exposed_through(settings)
    refusal = exposure_refusal(args.host, tokens=len(tokens), read_only=read_only,
                               public_without_token=args.public_without_token, exposed=exposed)
    if refusal:
        print(f"insights: {refusal}", file=sys.stderr)
        return 2
    if not tokens and not read_only and (exposed or not is_loopback(args.host)):
        print(f"insights: warning: serving {args.host} with no access token (--public-without-token): "
              "anyone who reaches this address can use it.", file=sys.stderr, flush=True)
    app = create_app(config)
    # waitress would otherwise buffer bodies up to its own 1 GiB default before Flask's limit applies.
    # It answers a longer body with its own 413 in plain text, before reading it (docs/api.md).
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           max_request_body_size=int(app.config["MAX_CONTENT_LENGTH"]))
    host = server.effective_host
    host = f"[{host}]" if ":" in str(host) else host
    access = app.extensions["insights.access"]
    n = len(access.tokens)
    how = "read-only" if access.read_only else f"{n} token{'s' * (n != 1)}" if n else "no token"
    print(f"Insights is serving on http://{host}:{server.effective_port}/ "
          f"(device {app.extensions['insights'].models.device}, instance {app.instance_path}, access: {how})",
          flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions["insights"].jobs.shutdown()
        server.close()


if __name__ == "__main__":
    sys.exit(main())
