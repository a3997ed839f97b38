"""Serve the Insights dashboard: ``python app.py [--host H] [--port P] [--device auto] ...``.

The same command as ``insights serve`` (insights/cli.py, where the code lives), kept here so a
checkout serves with no install step."""
from __future__ import annotations

import sys

from insights.cli import exposed_through, exposure_refusal, is_loopback, parse_args, threads_refusal
from insights.cli import serve as main

__all__ = ["exposed_through", "exposure_refusal", "is_loopback", "main", "parse_args", "threads_refusal"]

if __name__ == "__main__":
    sys.exit(main())
