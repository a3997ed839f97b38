"""``python -m insights serve ...`` and ``python -m insights explain ...`` (see insights/cli.py)."""
import sys

from .cli import main

sys.exit(main())
