"""Insights: explain PyTorch image classifiers.

The engine (``attribute``, ``methods``, ``method_info``) needs only torch; ``create_app`` builds
the Flask dashboard and imports Flask lazily.
"""
from .engine import (Cancelled, InsightsError, ParamError, UnknownMethod, attribute, attribute_many,
                      method_info, methods)

__version__ = "0.1.0"


def create_app(config: dict | None = None):
    """Builds the Flask application (see insights.app)."""
    from .app import create_app as _create_app

    return _create_app(config)


__all__ = ["attribute", "attribute_many", "methods", "method_info", "create_app", "Cancelled", "InsightsError",
           "ParamError", "UnknownMethod", "__version__"]
