"""Serve the Insights dashboard: ``python app.py [--host H] [--port P] [--device auto] ...``."""
from __future__ import annotations

import argparse
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
    args = p.parse_args(argv)
    if args.torchscript and args.exported:
        p.error("serve either --torchscript or --exported, not both")
    if bool(args.torchscript or args.exported) != bool(args.labels):
        p.error("--torchscript and --labels go together (as do --exported and --labels)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from waitress import create_server

    from insights import create_app

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
    app = create_app(config)
    # waitress would otherwise buffer bodies up to its own 1 GiB default before Flask's limit applies.
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           max_request_body_size=int(app.config["MAX_CONTENT_LENGTH"]))
    host = server.effective_host
    host = f"[{host}]" if ":" in str(host) else host
    print(f"Insights is serving on http://{host}:{server.effective_port}/ "
          f"(device {app.extensions['insights'].models.device}, instance {app.instance_path})", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        app.extensions["insights"].jobs.shutdown()
        server.close()


if __name__ == "__main__":
    sys.exit(main())
