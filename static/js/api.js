// The page's only source of truth: small wrappers over the /api endpoints (docs/api.md).

export class ApiError extends Error {
  constructor(status, body, retryAfter = null) {
    const err = (body && body.error) || {};
    super(err.message || `The server answered ${status}.`);
    this.status = status;
    this.code = err.code || (status === 0 ? "network" : "internal");
    this.field = err.field || null;
    this.retryAfter = retryAfter; // seconds (Retry-After), when the server is busy
  }
}

/** One call of the API: {status, data}, or an ApiError with the server's message. */
export async function request(method, url, body, headers = {}) {
  // X-Requested-With: a change signed in by cookie must carry it (insights/auth.py, CSRF).
  const init = { method, headers: { Accept: "application/json", "X-Requested-With": "insights", ...headers } };
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
  if (!res.ok) throw new ApiError(res.status, data, Number(res.headers.get("Retry-After")) || null);
  return { status: res.status, data };
}

const UPLOAD_OVERHEAD = 1024; // bytes of a multipart body besides the file (boundaries, headers, name)
const BUSY_TRIES = 3;
const BUSY_WAIT_MAX_S = 10;

/** Runs a write, and again after the server's Retry-After while it is busy for a short while. */
export async function patiently(send) {
  for (let tries = 1; ; tries++) {
    try {
      return await send();
    } catch (e) {
      if (e.code !== "busy" || !e.retryAfter || e.retryAfter > BUSY_WAIT_MAX_S || tries >= BUSY_TRIES) throw e;
      await new Promise((resolve) => setTimeout(resolve, e.retryAfter * 1000));
    }
  }
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
    // A body over the limit is refused by the server before it is read (waitress answers 413 in
    // plain text, often while the browser still sends, which it reports as a lost connection):
    // a file that cannot fit is refused here, with the server's words.
    const limit = Number(document.querySelector('meta[name="insights-max-upload"]')?.content) || 0;
    if (limit && file.size + UPLOAD_OVERHEAD > limit) {
      return Promise.reject(new ApiError(413, { error: { code: "too_large", field: "image", message:
        `the picture is ${file.size} bytes, larger than the limit of ${limit} bytes (MAX_CONTENT_LENGTH)` } }));
    }
    const form = new FormData();
    form.append("image", file, file.name || "pasted.png");
    return patiently(() => request("POST", "/api/images", form)).then((r) => r.data);
  },
  sample: (name) => patiently(() => request("POST", `/api/samples/${encodeURIComponent(name)}`)).then((r) => r.data),
  /** The top classes; a prediction the server queued (202) is followed to its answer. */
  async predict(model, image, topK = 5) {
    const r = await patiently(() => request("POST", "/api/predict", { model, image, top_k: topK }));
    return r.status === 202 ? outcome(await followJob(r.data.job, () => {})).result : r.data;
  },
  explain: (body) => patiently(() => request("POST", "/api/explain", body)).then((r) => r.data),
  result: (id) => request("GET", `/api/results/${encodeURIComponent(id)}`).then((r) => r.data),
  job: (id) => request("GET", `/api/jobs/${encodeURIComponent(id)}`).then((r) => r.data),
  /** Cancels a job this page submitted: `job` is the job of the 202 answer, with its cancel token. */
  cancel: (job) => request("DELETE", `/api/jobs/${encodeURIComponent(job.id)}`, undefined,
    { "X-Cancel-Token": job.cancel_token || "" }).then((r) => r.data),

  // Datasets (docs/api.md, "Datasets"). `query` is a URLSearchParams of the items query.
  /** The datasets served, and those that could not be opened ({name, error}) as `.unavailable`. */
  datasets: () => request("GET", "/api/datasets").then((r) => Object.assign(r.data.datasets, { unavailable: r.data.unavailable || [] })),
  datasetItems: (name, query) => request("GET", `${dataset(name)}/items?${query}`).then((r) => r.data),
  datasetSummary: (name, models) =>
    request("GET", `${dataset(name)}/summary?${models.map((m) => `model=${encodeURIComponent(m)}`).join("&")}`)
      .then((r) => r.data),
  predictions: (name, model) =>
    request("GET", `${dataset(name)}/predictions?model=${encodeURIComponent(model)}`).then((r) => r.data),
  startPredictions: (name, model) => request("POST", `${dataset(name)}/predictions`, { model }).then((r) => r.data),
  stopPredictions: (name, model) =>
    request("DELETE", `${dataset(name)}/predictions?model=${encodeURIComponent(model)}`).then((r) => r.data),
  /** Stores a dataset item as an upload: {image: {id, url, width, height}, index, key, true, error}. */
  datasetImage: (name, index) =>
    patiently(() => request("POST", `${dataset(name)}/items/${Number(index)}/image`)).then((r) => r.data),
  /** Queues a batch explanation: the job (with its cancel token). */
  explainDataset: (name, body) =>
    patiently(() => request("POST", `${dataset(name)}/explain`, body)).then((r) => r.data.job),
};

function dataset(name) {
  return `/api/datasets/${encodeURIComponent(name)}`;
}

const FINAL = new Set(["done", "failed", "cancelled"]);

/**
 * Follows a job until it ends, calling onUpdate(job) on each change. Uses server-sent events; a
 * stream the server ends after EVENT_STREAM_MAX_S ("expired") is opened again, and a stream
 * refused (MAX_EVENT_STREAMS) or broken falls back to polling. Resolves with the final job, or
 * with the state given to the promise's stop(state) (this page stops following it).
 */
export function followJob(job, onUpdate) {
  let stop = () => {};
  const following = new Promise((resolve) => {
    let finished = false;
    let timer = null;
    let source = null;
    let delay = 500;
    const finish = (j) => {
      if (finished) return;
      finished = true;
      if (source) source.close();
      clearTimeout(timer);
      resolve(j);
    };
    stop = (j) => {
      if (!finished) onUpdate(j);
      finish(j);
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
      delay = Math.min(2000, delay * 1.25); // a long job is polled less often as it goes on
      if (!finished) timer = setTimeout(poll, delay);
    };
    const listen = () => {
      source = new EventSource(`/api/jobs/${encodeURIComponent(job.id)}/events`);
      source.onmessage = (ev) => {
        try {
          update(JSON.parse(ev.data));
        } catch (e) {
          /* a malformed event is ignored; the next one or the poll catches up */
        }
      };
      source.addEventListener("expired", () => {
        source.close();
        if (!finished) listen();
      });
      source.onerror = () => {
        source.close();
        source = null;
        poll();
      };
    };
    onUpdate(job);
    if (FINAL.has(job.status)) return finish(job);
    if (typeof EventSource === "function") listen();
    else poll();
  });
  following.stop = (j) => stop(j);
  return following;
}

/** A finished job's answer (its `result`), or the error it ended with. */
function outcome(final) {
  if (final.status === "done") return final;
  if (final.status === "cancelled") {
    const e = new Error("Cancelled.");
    e.cancelled = true;
    throw e;
  }
  const err = typeof final.error === "string" ? { message: final.error } : final.error || {};
  throw new ApiError(422, { error: { message: err.message || "The job failed.", code: err.code, field: err.field } });
}

/**
 * Explains and, for queued work, follows the job to the result. hooks: {onJob(job, cancel),
 * onProgress(job)}; cancel() cancels the job for this page (with its cancel token) and stops
 * following it: a job shared with another identical request goes on for the other.
 */
export async function explainToResult(body, hooks = {}) {
  const answer = await api.explain(body);
  if (answer.status === "done" && answer.result) return { ...answer.result, cached: !!answer.cached };
  const final = await followSubmitted(answer.job, hooks);
  return api.result(final.result_id);
}

/**
 * Follows a job this page submitted (with its cancel token) to its end: resolves with the done
 * job, throws the error it failed with, or an error with `cancelled` set. hooks as for
 * explainToResult: onJob(job, cancel) once, onProgress(job) on each change.
 */
export async function followSubmitted(job, hooks = {}) {
  let following = null;
  const cancel = async () => {
    const state = await api.cancel(job);
    if (following) following.stop({ ...state, status: "cancelled", eta_s: null });
    return state;
  };
  if (hooks.onJob) hooks.onJob(job, cancel);
  following = followJob(job, (j) => hooks.onProgress && hooks.onProgress(j));
  return outcome(await following);
}
