"""Batch explanations outside a request: the ``insights explain`` command's engine room.

:func:`explain_items` explains a dataset's items with one method, storing each result in the app's
store (so a server on the same store serves their share links) and reusing results stored before,
which makes a re-run resume where the last one stopped.
"""
from __future__ import annotations

from typing import Any, Callable

from .dataset_jobs import parse_target, run_batch
from .datasets import Dataset


def explain_items(service, dataset: Dataset, indices: list[int], model: str, method: str, params: dict | None,
                  target: Any = "predicted", progress: Callable[[int, int], None] | None = None,
                  cancel: Any = None) -> list[dict]:
    """One row per item: ``index``, ``key``, ``true`` ({index, label} or None), ``prediction``
    ({index, label, prob}), ``target``, ``method``, ``image`` (its id in the store), ``result``
    (the result id, the share link's), ``cached`` (stored before) and ``error`` (None, or why the
    item was skipped). ``target`` is ``predicted``, ``true`` or a class index; ``progress`` is
    called with (forward passes done, total); ``cancel`` is an Event or a callable."""
    name = service.model_name(model)
    p, info = service.plan(name, method, params or {})
    goal = parse_target(target, service.models.spec(name).num_classes)
    return run_batch(service, dataset, list(indices), name, method, p, info, goal, progress=progress, cancel=cancel)
