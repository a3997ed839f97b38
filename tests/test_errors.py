"""The one mapping from exceptions to answers (insights/errors.py)."""
from __future__ import annotations

import logging
import re
import urllib.error

import pytest

from insights import imaging
from insights.engine import ParamError, UnknownMethod
from insights.errors import BadParam, NotFound, ServiceError, as_int, as_number, describe
from insights.models import ModelUnavailable, UnknownModel


@pytest.mark.parametrize("exc, answer", [
    (NotFound("no job", "job"), (404, "not_found", "no job", "job")),
    (BadParam("n: bad", "n"), (400, "bad_param", "n: bad", "n")),
    (ServiceError("too many", "params", code="over_budget"), (400, "over_budget", "too many", "params")),
    (imaging.ImageError("huge", code="too_large"), (413, "too_large", "huge", "image")),
    (imaging.ImageError("not a picture"), (400, "bad_image", "not a picture", "image")),
    (UnknownModel("x", ["tiny"]), (400, "unknown_model", "unknown model 'x'; known models: tiny", "model")),
    (ModelUnavailable("x", "no weights"), (503, "model_unavailable", "model 'x' is not available: no weights",
                                           "model")),
    (UnknownMethod("x", ["saliency"]), (400, "unknown_method", "unknown method 'x'; known methods: saliency",
                                        "method")),
    (ParamError("target", "out of range"), (400, "bad_target", "target: out of range", "target")),
    (ParamError("n_steps", "too big"), (400, "bad_param", "n_steps: too big", "n_steps")),
])
def test_each_error_maps_to_its_status_code_and_field(exc, answer):
    d = describe(exc)
    assert (d.status, d.code, d.message, d.field) == answer
    assert d.as_dict() == {"code": answer[1], "message": answer[2], "field": answer[3]}


def test_anything_else_is_a_500_that_names_only_a_request_id_and_logs_the_detail(caplog):
    caplog.set_level(logging.ERROR, "insights.errors")
    exc = FileNotFoundError(2, "No such file or directory", "/srv/insights/index.sqlite3")
    d = describe(exc)
    rid = re.fullmatch(r"internal error; request id ([0-9a-f]{32})", d.message).group(1)
    assert (d.status, d.code, d.field) == (500, "internal", None)
    [record] = caplog.records
    assert record.request_id == rid and record.exc_info[1] is exc  # the detail is in the log only
    # Described again (a failed job re-raised in the request that waited for it): the same
    # failure, logged once, and a request's own id points to the first one.
    assert describe(exc).message == d.message and len(caplog.records) == 1
    assert describe(exc, "req-1").message == "internal error; request id req-1"
    assert caplog.records[-1].request_id == "req-1" and rid in caplog.records[-1].getMessage()


def test_a_500_uses_the_request_id_it_is_given():
    d = describe(ZeroDivisionError("division by zero"), "3f2b1c9e")
    assert d.as_dict() == {"code": "internal", "message": "internal error; request id 3f2b1c9e", "field": None}


def test_another_librarys_exception_with_a_status_is_still_internal():
    err = urllib.error.HTTPError("http://x", 404, "Not Found", {}, None)
    assert hasattr(err, "status") and hasattr(err, "code")
    assert (describe(err).status, describe(err).code) == (500, "internal")


@pytest.mark.parametrize("value, want", [(3, 3), ("4", 4), (5.0, 5), (" 6 ", 6)])
def test_integers_in_range(value, want):
    assert as_int(value, "k", 1, 10) == want


@pytest.mark.parametrize("value, words", [
    (0, "between 1 and 10, got 0"), (10 ** 400, "between 1 and 10"), ("1e400", "must be an integer"),
    (2.5, "must be an integer"), (True, "must be an integer"), ("nan", "must be an integer"), ([1], "must be an integer"),
])
def test_bad_integers_name_the_field(value, words):
    with pytest.raises(BadParam) as info:
        as_int(value, "k", 1, 10, code="bad_target")
    assert info.value.field == "k" and info.value.code == "bad_target" and words in info.value.message


@pytest.mark.parametrize("value, words", [("x", "must be a number"), (2, "between 0.0 and 1.0"),
                                          (None, "must be a number")])
def test_bad_numbers_name_the_field(value, words):
    with pytest.raises(BadParam) as info:
        as_number(value, "alpha", 0.0, 1.0)
    assert info.value.field == "alpha" and words in info.value.message


# --------------------------------------------------------------------------- huge numbers, deep JSON

from appkit import app, client, extra_methods, image_id, snapshot  # noqa: E402,F401

HUGE = "1" + "0" * 400  # an integer literal far beyond any float


@pytest.mark.parametrize("path, template, field, words", [
    ("/api/predict", '{"image": "%s", "top_k": %s}', "top_k", "must be between 1 and"),
    ("/api/explain", '{"image": "%s", "method": "saliency", "target": %s}', "target", "must be between 0 and"),
    ("/api/explain", '{"image": "%s", "method": "integrated_gradients", "params": {"n_steps": %s}}',
     "n_steps", "must be at most 1024"),
    ("/api/explain", '{"image": "%s", "method": "integrated_gradients", "params": {"n_steps": -%s}}',
     "n_steps", "must be at least 1"),
    ("/api/explain", '{"image": "%s", "method": "integrated_gradients", "params": {"stdevs": %s}}',
     "stdevs", "must be at most"),
    ("/api/explain", '{"image": "%s", "method": "occlusion", "params": {"sliding_window_shapes": [3, %s, 8]}}',
     "sliding_window_shapes", "out of range"),
])
def test_an_integer_beyond_any_float_is_a_400_naming_the_field(client, image_id, path, template, field, words):
    r = client.post(path, data=template % (image_id, HUGE), content_type="application/json")
    assert r.status_code == 400, r.json
    err = r.json["error"]
    assert err["field"] == field and words in err["message"]
    assert len(err["message"]) < 200  # the 401-digit number is not echoed whole


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 9 + "1" + "}" * 9,
                                  '{"image": "x", "params": {"a": ' + "[" * 50 + "]" * 50 + "}}"])
def test_json_nested_too_deep_is_a_400_and_writes_nothing(app, client, text):
    before = snapshot(app.instance_path)
    r = client.post("/api/explain", data=text, content_type="application/json")
    assert r.status_code == 400
    assert r.json["error"] == {"code": "bad_request", "field": None,
                               "message": "the JSON body nests deeper than 8 levels"}
    assert snapshot(app.instance_path) == before
    assert client.get("/api/models").status_code == 200  # and the server keeps serving
