// The page's only source of truth: small wrappers over the /api endpoints (docs/api.md).

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `The server answered ${status}.`);
    this.status = status;
    this.code = err.code || (status === 0 ? "network" : "internal");
    this.field = err.field || null;
  }
}

async function request(method, url, body) {
  // X-Requested-With: a change signed in by cookie must carry it (insights/auth.py, CSRF).
  const init = { method, headers: { Accept: "application/json", "X-Requested-With": "insights" } };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, { error: { message: "Could not reach the server. Is it still running?" } });
  }
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = null;
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return { status: res.status, data };
}

export const api = {
  models: () => request("GET", "/api/models").then((r) => r.data.models),
  methods: (model) => request("GET", model ? `/api/methods?model=${encodeURIComponent(model)}` : "/api/methods")
    .then((r) => r.data.methods),
  samples: () => request("GET", "/api/samples").then((r) => r.data.samples),
  labels: (model, q, limit = 8) =>
    request("GET", `/api/models/${encodeURIComponent(model)}/labels?q=${encodeURIComponent(q)}&limit=${limit}`)
      .then((r) => r.data.results),
  upload(file) {
    const form = new FormData();
    form.append("image", file, file.name || "pasted.png");
    return request("POST", "/api/images", form).then((r) => r.data);
  },
  sample: (name) => request("POST", `/api/samples/${encodeURIComponent(name)}`).then((r) => r.data),
  predict: (model, image, topK = 5) => request("POST", "/api/predict", { model, image, top_k: topK }).then((r) => r.data),
  explain: (body) => request("POST", "/api/explain", body).then((r) => r.data),
  result: (id) => request("GET", `/api/results/${encodeURIComponent(id)}`).then((r) => r.data),
  job: (id) => request("GET", `/api/jobs/${encodeURIComponent(id)}`).then((r) => r.data),
  cancel: (id) => request("DELETE", `/api/jobs/${encodeURIComponent(id)}`).then((r) => r.data),
};

const FINAL = new Set(["done", "failed", "cancelled"]);

/**
 * Follows a job until it ends, calling onUpdate(job) on each change. Uses server-sent events
 * and falls back to polling when the stream breaks. Resolves with the final job.
 */
export function followJob(job, onUpdate) {
  return new Promise((resolve) => {
    let finished = false;
    let timer = null;
    let source = null;
    const finish = (j) => {
      if (finished) return;
      finished = true;
      if (source) source.close();
      clearTimeout(timer);
      resolve(j);
    };
    const update = (j) => {
      if (finished) return;
      onUpdate(j);
      if (FINAL.has(j.status)) finish(j);
    };
    const poll = async () => {
      if (finished) return;
      try {
        update(await api.job(job.id));
      } catch (e) {
        if (e.status === 404) return finish({ ...job, status: "failed", error: { message: "The job has gone." } });
      }
      if (!finished) timer = setTimeout(poll, 400);
    };
    onUpdate(job);
    if (FINAL.has(job.status)) return finish(job);
    if (typeof EventSource === "function") {
      source = new EventSource(`/api/jobs/${encodeURIComponent(job.id)}/events`);
      source.onmessage = (ev) => {
        try {
          update(JSON.parse(ev.data));
        } catch (e) {
          /* a malformed event is ignored; the next one or the poll catches up */
        }
      };
      source.onerror = () => {
        source.close();
        source = null;
        poll();
      };
    } else poll();
  });
}

/** Explains and, for queued work, follows the job to the result. hooks: {onJob, onProgress}. */
export async function explainToResult(body, hooks = {}) {
  const answer = await api.explain(body);
  if (answer.status === "done" && answer.result) return { ...answer.result, cached: !!answer.cached };
  const job = answer.job;
  if (hooks.onJob) hooks.onJob(job);
  const final = await followJob(job, (j) => hooks.onProgress && hooks.onProgress(j));
  if (final.status === "done") return api.result(final.result_id);
  if (final.status === "cancelled") {
    const e = new Error("Cancelled.");
    e.cancelled = true;
    throw e;
  }
  const err = typeof final.error === "string" ? { message: final.error } : final.error || {};
  throw new ApiError(422, { error: { message: err.message || "The job failed.", code: err.code, field: err.field } });
}
