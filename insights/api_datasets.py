"""The datasets' JSON API (docs/api.md, "Datasets"): views on the api blueprint that parse a
request, call the service's dataset work and serialise."""
from __future__ import annotations

from flask import Response, jsonify, request

from .admission import client_id
from .api import body, bp, queued, service, write


def dataset(name: str):
    return service().datasets.get(name)


def query() -> dict:
    """The items query's parameters (``model`` may repeat)."""
    args = {k: request.args.get(k) for k in ("true", "predicted", "correct", "min_prob", "max_prob", "sort", "page",
                                              "per_page")}
    args["model"] = request.args.getlist("model")
    return args


@bp.get("/datasets")
def datasets():
    """Every dataset with its size and label counts, and those that could not be opened, with why."""
    svc = service()
    out = []
    for name in svc.datasets.names():
        ds = svc.datasets.get(name)
        out.append({**ds.describe(), "links": {"items": f"/api/datasets/{name}/items",
                                               "summary": f"/api/datasets/{name}/summary"}})
    unavailable = [{"name": n, "error": why} for n, why in svc.datasets.unavailable.items()]
    return jsonify({"datasets": out, "unavailable": unavailable})


@bp.get("/datasets/<name>/items")
def dataset_items(name: str):
    """A page of items with each model's prediction, filtered and sorted (scoring starts in the
    background for models that have not scored them yet)."""
    return jsonify(service().dataset_work.items(dataset(name), query()))


@bp.get("/datasets/<name>/summary")
def dataset_summary(name: str):
    """Accuracy per model, per-class counts and a confusion matrix (up to 50 classes)."""
    return jsonify(service().dataset_work.summary(dataset(name), request.args.getlist("model")))


@bp.get("/datasets/<name>/items/<int:index>/thumb")
def dataset_thumb(name: str, index: int):
    """The item's image as a small JPEG (``size``: 96, 160 or 256 pixels on the longer side)."""
    data = service().dataset_work.thumbnail(dataset(name), index, request.args.get("size", 160))
    resp = Response(data, mimetype="image/jpeg")
    resp.cache_control.private = True
    resp.cache_control.max_age = 3600
    return resp


@bp.post("/datasets/<name>/items/<int:index>/image")
@write
def dataset_item_image(name: str, index: int):
    """Stores the item's image as an upload (to explain it alone); answers its record and label."""
    from .api import image_json

    answer = service().dataset_work.store_item(dataset(name), index)
    return jsonify({**answer, "image": image_json(answer["image"])}), 201


@bp.get("/datasets/<name>/predictions")
def dataset_predictions(name: str):
    """The progress of a model's predictions over the dataset."""
    ds = dataset(name)
    model = service().model_name(request.args.get("model") or None)
    return jsonify({"model": model, **service().dataset_work.status(ds, model)})


@bp.post("/datasets/<name>/predictions")
@write
def start_predictions(name: str):
    """Starts (or resumes) a model's predictions over the dataset."""
    ds = dataset(name)
    model = service().model_name(body().get("model"))
    return jsonify({"model": model, **service().dataset_work.start(ds, model, asked=True)}), 202


@bp.delete("/datasets/<name>/predictions")
@write
def stop_predictions(name: str):
    """Stops a model's predictions over the dataset (what was scored stays)."""
    ds = dataset(name)
    model = service().model_name(request.args.get("model") or None)
    return jsonify({"model": model, **service().dataset_work.stop(ds, model)})


@bp.post("/datasets/<name>/explain")
@write
def dataset_explain(name: str):
    """Explains the selected items (``items``, or every item matching ``filter``) with one method,
    as one job (202); its result lists each item's result id."""
    return queued(service().dataset_work.explain(dataset(name), body(), client_id()))
