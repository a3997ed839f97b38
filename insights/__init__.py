"""Insights: explain PyTorch image classifiers.

The engine (``attribute``, ``methods``, ``method_info``) needs only torch; ``create_app`` builds
the Flask dashboard and ``show`` serves it from a notebook; both import Flask lazily.
"""
from .engine import (Cancelled, InsightsError, ParamError, UnknownMethod, attribute, attribute_many,
                      method_info, methods)
# Not ``metrics``: insights/metrics.py (Prometheus) is imported by that name.
from .engine import evaluate, list_metrics, metric_info

__version__ = "0.1.0"


def create_app(config: dict | None = None):
    """Builds the Flask application (see insights.app)."""
    from .app import create_app as _create_app

    return _create_app(config)


def __getattr__(name: str):
    # ``insights.show`` (the dashboard from a notebook) loads waitress and Flask on first use only.
    if name == "show":
        from .notebook import show

        return show
    raise AttributeError(f"module 'insights' has no attribute {name!r}")


__all__ = ["attribute", "attribute_many", "methods", "method_info", "create_app", "show", "Cancelled",
           "InsightsError", "ParamError", "UnknownMethod", "__version__"]
__all__ += ["evaluate", "list_metrics", "metric_info"]
