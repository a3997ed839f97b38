"""The application factory: settings, the service (models, store, jobs) and the blueprints."""
from __future__ import annotations

import json
import os

from flask import Flask

from . import imaging, metrics, security
from .service import Service

PACKAGE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PACKAGE)
# Installed from a wheel, the page's files ship inside the package (insights/static, insights/templates)
# and the instance folder defaults to ./instance; in a source checkout (or an editable install) the
# page's files and the instance folder sit at the top of the repository.
INSTALLED = os.path.isdir(os.path.join(PACKAGE, "templates"))
HOME = PACKAGE if INSTALLED else ROOT

# Every setting with its default; docs/api.md ("Settings") describes each one. Any of them can
# also be set from the environment as INSIGHTS_<NAME> (a JSON value or a plain string).
DEFAULTS = {
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,  # bytes of one request body (uploads)
    "MAX_IMAGE_PIXELS": 40_000_000,  # width × height of an upload
    "INLINE_MAX_PASSES": 64,  # explanations with more forward passes run as jobs
    "MAX_PASSES": None,  # explanations with more forward passes are refused (None: 4000 on CPU, 20000 on GPU)
    "MAX_TOP_K": 100,  # most predictions one /api/predict answers
    "MAX_LOADED_MODELS": 2,  # models kept in memory (least recently used dropped)
    "JOBS_KEPT": 200,  # finished jobs remembered for clients
    "BATCH_WINDOW_MS": 5,  # how long the worker waits to batch concurrent requests of one kind
    "BATCH_MAX": 16,  # most requests in one batched pass
    "MEMORY_BUDGET": None,  # bytes of activations per batch (None: the engine's default)
    "TWIN": True,  # the engine runs hook-free passes on a traced copy with batch norms folded
    "CUDA_GRAPHS": True,  # the engine replays repeated GPU batches as CUDA graphs
    "CUDA_FUSED": True,  # the engine scores bf16 GPU batches with fused conv + bias + ReLU
    "CPU_SLICES": True,  # the engine runs early layers of CPU scoring batches in cache-sized slices
    "SSE_HEARTBEAT_S": 15,  # seconds between keep-alive comments on an idle event stream
    "DEVICE": "auto",  # cpu, cuda, cuda:N or auto
    "ALLOW_DOWNLOAD": False,  # let torchvision download missing weights on first use
    "BUILTIN_MODELS": True,  # efficientnet_lite0 and the torchvision classifiers
    "MODELS_CONFIG": None,  # Python file(s) calling register(...)
    "TORCHSCRIPT": None,  # a TorchScript classifier ...
    "TORCHSCRIPT_LABELS": None,  # ... and its labels file, one class per line
    "EXPORTED": None,  # a torch.export program (.pt2) ...
    "EXPORTED_LABELS": None,  # ... and its labels file
    "DEFAULT_MODEL": None,  # None: efficientnet_lite0, or the TorchScript model when given
    "STORE_PATH": None,  # None: the instance folder
    # -- hosting (docs/api.md, "Settings"; README, "Host it for your team") --
    "MAX_ASPECT_RATIO": 16,  # uploads longer than this many times their width (or wider) are refused
    "UPLOAD_MAX_SIDE": 2048,  # uploads are reduced to at most this many pixels on the longer side
    "TOKENS": None,  # access tokens (a list, or a comma-separated string); None: no sign-in
    "TOKENS_FILE": None,  # a file of access tokens, one per line
    "READ_ONLY": False,  # serve only share pages and result files; every write answers 403
    "SIGNIN_ATTEMPTS_PER_MIN": 10,  # wrong access tokens one address may send a minute; beyond this 429
    "MAX_QUEUED_JOBS": 32,  # jobs waiting or running at once; beyond this new work gets 503
    "MAX_JOBS_PER_CLIENT": 4,  # jobs one client may have waiting or running; beyond this 429
    "RATE_LIMIT_PER_MIN": 120,  # writes one client may make per minute; beyond this 429
    "INLINE_TIMEOUT_S": 10,  # a request waits this long for its computation, then answers 202 with the job
    "MAX_INLINE_WAITS": 4,  # requests waiting for their computation at once; beyond this 202 at once
    "MAX_EVENT_STREAMS": 2,  # event streams open at once; beyond this 503 (the page polls instead)
    "EVENT_STREAM_MAX_S": 60,  # seconds an event stream stays open before the server ends it
    "STORE_MAX_BYTES": 5 * 1024 ** 3,  # bytes of images and results kept; oldest evicted, else 507
    "RETENTION_DAYS": None,  # results and unreferenced uploads older than this are deleted (None: kept)
    "PUBLIC_URL": None,  # the address people reach the server at, for share links and previews
    "TRUSTED_HOSTS": None,  # Host header values the server answers (Flask's own setting)
    "PROXY_HOPS": 0,  # proxies in front whose X-Forwarded-* headers are trusted (werkzeug ProxyFix)
    "FRAME_ANCESTORS": "'self'",  # who may embed the pages in a frame (CSP frame-ancestors)
    # -- scale-out (docs/api.md, "Scale-out settings"; README, "Scale out") --
    "BROKER_URL": None,  # redis://host:port/db: jobs run on Celery workers (None: the in-process worker)
    "DATABASE_URL": None,  # postgresql://...: the index of images, results and jobs (None: SQLite in the store)
    "BLOB_DIR": None,  # with DATABASE_URL: the folder every node mounts for files (replaces STORE_PATH)
    "BROKER_VISIBILITY_S": 60,  # with BROKER_URL: a message a lost worker held is given back after this
    # -- datasets (docs/api.md, "Datasets"; README, "Browse a labelled dataset") --
    "DATASETS": None,  # labelled image folders (ImageFolder) or CSV files of path,label (--dataset)
    "DATASET_MAX_ITEMS": 100_000,  # most items one dataset may list; a larger one is refused at start-up
    "BATCH_MAX_ITEMS": 1000,  # most items one batch explanation may cover
    "BATCH_MAX_PASSES": None,  # forward passes one batch explanation may take (None: 25 × MAX_PASSES)
}


def env_settings(environ=os.environ) -> dict:
    """INSIGHTS_<SETTING> environment variables, parsed as JSON when they are JSON."""
    out = {}
    for key in DEFAULTS:
        raw = environ.get("INSIGHTS_" + key)
        if raw is None:
            continue
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def create_app(config: dict | None = None) -> Flask:
    """Builds the app; ``config`` overrides the defaults and the environment (tests pass a temp
    ``INSTANCE_PATH``, tiny limits and their own models config)."""
    config = dict(config or {})
    instance = (config.pop("INSTANCE_PATH", None) or os.environ.get("INSIGHTS_INSTANCE")
                or ("instance" if INSTALLED else os.path.join(ROOT, "instance")))
    app = Flask("insights", instance_path=os.path.abspath(instance),
                static_folder=os.path.join(HOME, "static"), template_folder=os.path.join(HOME, "templates"))
    app.config.from_mapping(DEFAULTS)
    app.config.update(env_settings())
    app.config.update(config)
    app.config.update(
        # PNG and .npy are already compressed or binary: compress text only.
        COMPRESS_MIMETYPES=["application/json", "text/html", "text/css", "text/javascript",
                            "application/javascript", "image/svg+xml", "text/plain"],
        COMPRESS_ALGORITHM=["br", "gzip", "deflate"],
        COMPRESS_STREAMS=False,  # never buffer server-sent events
    )
    os.makedirs(app.instance_path, exist_ok=True)
    # First: the deploy settings are checked before any model loads, and the host check and the
    # request id come before every other before-request hook.
    security.init_app(app)

    service = Service()
    service.init_app(app)
    # torchvision (for preprocessing) now, not in the first prediction: see imaging.warm.
    imaging.warm()
    app.extensions["insights"] = service
    app.extensions["insights.store"] = service.store
    metrics.init_app(app)  # /healthz and /metrics

    from flask_compress import Compress

    Compress().init_app(app)

    from . import api, auth, pages

    auth.init_app(app)  # before the views and the admission limits: its gate sets g.token for them
    api.init_app(app)
    app.register_blueprint(pages.bp)
    return app
