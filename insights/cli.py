"""The command line: ``insights serve`` (the dashboard and API with waitress; ``python app.py`` is the
same command) and ``insights explain`` (explain an image, a folder or a dataset into the store, with
a CSV and an HTML report). ``python -m insights`` runs it too."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
import time

# --------------------------------------------------------------------------- serve


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say where models, the instance folder and datasets come from (both commands)."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.py",
                   help="Python file that registers models with register(...); may be repeated")
    p.add_argument("--torchscript", metavar="MODEL.pt", help="a TorchScript classifier to serve")
    p.add_argument("--exported", metavar="MODEL.pt2", help="a torch.export program (torch.export.save) to serve")
    p.add_argument("--labels", metavar="LABELS.txt", help="class names of --torchscript or --exported, one per line")
    p.add_argument("--instance", metavar="DIR", help="folder for uploads, results and the index (default ./instance)")
    p.add_argument("--dataset", action="append", default=None, metavar="[NAME=]PATH",
                   help="a labelled image folder (one sub-folder per class) or a CSV of path,label; "
                        "may be repeated; replaces INSIGHTS_DATASETS")


def check_model_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.torchscript and args.exported:
        p.error("serve either --torchscript or --exported, not both")
    if bool(args.torchscript or args.exported) != bool(args.labels):
        p.error("--torchscript and --labels go together (as do --exported and --labels)")


def serve_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve the Insights dashboard and JSON API with waitress.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    add_model_flags(p)
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
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The flags of ``insights serve`` (and of ``python app.py``)."""
    p = serve_parser(prog)
    args = p.parse_args(argv)
    check_model_flags(p, args)
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


def model_config(args: argparse.Namespace) -> dict:
    """The app settings the shared flags give (only those given: the rest come from the environment)."""
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
    if args.dataset is not None:
        config["DATASETS"] = list(args.dataset)
    return config


def serve(argv: list[str] | None = None, prog: str | None = None) -> int | None:
    """``insights serve``: checks the access settings, builds the app and serves it until Ctrl-C."""
    args = parse_args(argv, prog)
    from waitress import create_server

    import insights
    from insights.app import DEFAULTS, env_settings
    from insights.auth import AccessConfigError, flag, load_tokens

    config = model_config(args)
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
    app = insights.create_app(config)
    service = app.extensions["insights"]
    for name, why in service.datasets.unavailable.items():  # served on without them (docs/api.md, Datasets)
        print(f"insights: warning: dataset {name} is not served: {why}", file=sys.stderr, flush=True)
    for name in service.datasets.names():
        d = service.datasets.get(name)
        print(f"insights: dataset {name}: {len(d)} items, {len(d.classes())} classes"
              + "".join(f"; {note}" for note in d.notes), file=sys.stderr, flush=True)
    # waitress would otherwise buffer bodies up to its own 1 GiB default before Flask's limit applies.
    # It answers a longer body with its own 413 in plain text, before reading it (docs/api.md).
    server = create_server(app, host=args.host, port=args.port, threads=args.threads, asyncore_use_poll=True,
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
    return None


# --------------------------------------------------------------------------- explain

CHUNK_S = 20.0  # seconds of work between two points where a Ctrl-C keeps everything before it


class Refused(Exception):
    """Bad input to ``insights explain``: the message is the one line it prints before exiting 2."""


def explain_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Explain every image of SOURCE with one model and method, store the results "
                               "(their share links work on a server using the same instance folder) and write "
                               "OUT/results.csv and OUT/index.html. A re-run skips what is stored already.")
    p.add_argument("source", metavar="SOURCE",
                   help="an image, a folder (one sub-folder per class, or just images), a CSV of path,label, "
                        "or the name of a dataset given with --dataset or INSIGHTS_DATASETS")
    p.add_argument("--model", required=True, help="a model name (efficientnet_lite0, resnet50, ...)")
    p.add_argument("--method", required=True, help="an attribution method id (saliency, grad_cam, ...)")
    p.add_argument("--params", default="{}", metavar="JSON",
                   help='the method\'s parameters as a JSON object, e.g. \'{"n_steps": 32}\' (default: its defaults)')
    p.add_argument("--target", default="predicted", metavar="predicted|true|INDEX",
                   help="the class to explain: the model's top class (default), the item's true label, or "
                        "a class index")
    p.add_argument("--out", required=True, metavar="OUT", help="folder for results.csv, index.html and images/")
    add_model_flags(p)
    return p


def parse_target(value: str, num_classes: int) -> str | int:
    value = value.strip()
    if value in ("predicted", "true"):
        return value
    try:
        index = int(value)
    except ValueError:
        raise Refused(f"--target must be predicted, true or a class index, got {value!r}") from None
    if not 0 <= index < num_classes:
        raise Refused(f"--target {index} is out of range: the model has classes 0–{num_classes - 1}")
    return index


def parse_params(text: str) -> dict:
    try:
        params = json.loads(text)
    except ValueError as e:
        raise Refused(f"--params is not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(params, dict):
        raise Refused(f"--params must be a JSON object such as '{{\"n_steps\": 32}}', got {text!r}")
    return params


def source_path(source: str, entries: list) -> tuple[str, str | None]:
    """The path SOURCE names and the dataset name it was given (a configured dataset's ``name=``)."""
    from insights.datasets import default_name, parse_entry

    if os.path.exists(source):
        return source, None
    configured = [parse_entry(e) for e in entries if isinstance(e, str)]
    for name, path in configured:
        if source in (name, default_name(path)):
            return path, name or default_name(path)
    known = ", ".join(name or default_name(path) for name, path in configured)
    raise Refused(f"{source} does not exist" + (f" and is no configured dataset (datasets: {known})" if known
                                                  else " (nor is it a dataset given with --dataset)"))


def check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise Refused(f"--out {out} is a file; give a folder (it is made if missing)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise Refused(f"--out {out}: its parent folder {parent} does not exist")


class Progress:
    """The tqdm bar on stderr, fed by explain_items' progress callback chunk by chunk."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="item", desc="explaining", file=sys.stderr, dynamic_ncols=True,
                        smoothing=0.1)
        self.base = 0  # items done in earlier chunks

    def chunk(self, size: int):
        """The callback of one explain_items call over ``size`` items (it counts forward passes)."""
        def progress(done: int, total: int) -> None:
            self.bar.n = self.base + (size * min(done, total) // total if total > 0 else 0)
            self.bar.refresh()
        return progress

    def finish_chunk(self, size: int) -> None:
        self.base += size
        self.bar.n = self.base
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def explain(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``insights explain``: 0 when every item was handled (an unreadable image is a row with its
    error), 2 on bad input (nothing written), 130 after Ctrl-C (what finished is written)."""
    p = explain_parser(prog)
    args = p.parse_args(argv)
    check_model_flags(p, args)
    try:
        return _explain(args)
    except Refused as e:
        print(f"insights explain: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while the app or the model loads: nothing was explained yet
        print("insights explain: stopped (Ctrl-C) before any item was explained", file=sys.stderr)
        return 130


def _explain(args: argparse.Namespace) -> int:
    import insights
    from insights import report
    from insights.app import env_settings

    # What needs no model is checked before anything loads.
    params = parse_params(args.params)
    check_out(args.out)
    entries = args.dataset if args.dataset is not None else env_settings().get("DATASETS") or []
    path, dataset_name = source_path(args.source, [entries] if isinstance(entries, str) else list(entries))

    config = model_config(args)
    config["DATASETS"] = []  # this command opens its source itself, against --model's labels
    try:
        app = insights.create_app(config)
    except (ValueError, FileNotFoundError) as e:  # a bad models config, device or setting
        raise Refused(str(e)) from None
    service = app.extensions["insights"]
    try:
        return _run(args, app, service, path, dataset_name, params, report)
    finally:
        service.jobs.shutdown()


def _run(args, app, service, path: str, dataset_name: str | None, params: dict, report) -> int:
    from insights import batch, datasets
    from insights.errors import ServiceError
    from insights.engine import InsightsError

    names = service.models.names()
    if args.model not in names:
        raise Refused(f"unknown model {args.model!r}; models: {', '.join(names)}")
    try:
        service.model_name(args.model)
        service.plan(args.model, args.method, params)  # the method, its parameters and their cost
    except (InsightsError, ServiceError) as e:
        raise Refused(str(e)) from None
    except RuntimeError as e:  # the model is not available (weights missing)
        raise Refused(str(e)) from None
    labels = service.models.spec(args.model).labels
    target = parse_target(args.target, len(labels))
    try:
        dataset = datasets.open_source(path, labels, dataset_name,
                                       int(app.config.get("DATASET_MAX_ITEMS") or 100_000))
    except datasets.DatasetError as e:
        raise Refused(str(e)) from None
    if not len(dataset):
        raise Refused(f"{path} holds no images")
    if target == "true" and not any(item.label is not None for item in dataset.items):
        raise Refused(f"--target true needs labelled items, and {path} has none "
                      "(use a folder with one sub-folder per class, or a CSV of path,label)")
    os.makedirs(args.out, exist_ok=True)

    started = time.monotonic()
    rows: list[dict] = []
    bar = Progress(len(dataset))
    stopped = None  # why the run ended early: Ctrl-C, or an error of the store or the model
    indices = list(range(len(dataset)))
    # A chunk's results are stored when the whole chunk is done, so a Ctrl-C loses the chunk in
    # progress: chunks are sized to take about CHUNK_S seconds (one item first, to time it), and
    # at most BATCH_MAX items, which cheap methods batch in one pass.
    most = max(1, int(app.config.get("BATCH_MAX") or 16))
    start, size = 0, 1
    try:
        while start < len(indices):
            chunk = indices[start:start + size]
            began = time.monotonic()
            rows.extend(batch.explain_items(service, dataset, chunk, args.model, args.method, params, target,
                                            progress=bar.chunk(len(chunk))))
            bar.finish_chunk(len(chunk))
            start += len(chunk)
            per_item = max(time.monotonic() - began, 1e-3) / len(chunk)
            size = max(1, min(most, int(CHUNK_S / per_item)))
    except KeyboardInterrupt:
        stopped = "Ctrl-C"
    except (ServiceError, InsightsError, OSError, RuntimeError) as e:
        stopped = str(e)
    finally:
        bar.close()
    # A second Ctrl-C while the report is written would leave it half-done: it waits for this.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        public = app.config.get("PUBLIC_URL")
        written = report.write(args.out, rows, service.store, dataset=dataset, model=args.model,
                               method=args.method, params=params, target=args.target, public_url=public,
                               complete=stopped is None)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    cached = sum(1 for r in rows if r.get("cached"))
    failed = sum(1 for r in rows if r.get("error"))
    seconds = time.monotonic() - started
    summary = (f"{len(rows)} of {len(dataset)} items in {seconds:.1f} s: {len(rows) - cached - failed} computed, "
               f"{cached} cached, {failed} failed; report {written['html']}, table {written['csv']}")
    if stopped == "Ctrl-C":
        print(f"insights explain: stopped (Ctrl-C) after {summary}; run it again to go on", file=sys.stderr)
        return 130
    if stopped:
        print(f"insights explain: stopped: {stopped}; after {summary}", file=sys.stderr)
        return 1
    print(f"insights explain: {summary}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- entry point

COMMANDS = {"serve": (serve, "serve the dashboard and JSON API (the flags of python app.py)"),
            "explain": (explain, "explain an image, a folder or a dataset into the store, a CSV and an HTML report")}


def main(argv: list[str] | None = None) -> int | None:
    """``insights serve ...`` or ``insights explain ...`` (the console script and ``python -m insights``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "insights"
    prog = "insights" if prog in ("__main__.py", "-c", "") else prog
    if argv and argv[0] in COMMANDS:
        run, _help = COMMANDS[argv[0]]
        return run(argv[1:], prog=f"{prog} {argv[0]}")
    p = argparse.ArgumentParser(prog=prog, description="Explain PyTorch image classifiers.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_run_it, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    p.parse_args(argv)  # prints the usage (and exits 2) for no command or an unknown one; --help too
    return 2
