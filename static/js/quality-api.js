// The quality endpoints (docs/api.md, "Quality"): the metrics and their schemas, a result's stored
// measurements, and a measurement, inline or as a job followed with the house job helpers.
import { followSubmitted, patiently, request } from "./api.js";

let metricList = null;

/** GET /api/metrics, once per page. */
export function metrics() {
  if (!metricList) metricList = request("GET", "/api/metrics").then((r) => r.data.metrics).catch((e) => {
    metricList = null;
    throw e;
  });
  return metricList;
}

const base = (rid) => `/api/results/${encodeURIComponent(rid)}/quality`;

/** The stored measurements of a result, oldest first. */
export const storedQuality = (rid) => request("GET", base(rid)).then((r) => r.data.quality || []);

/**
 * Measures `metric` on the stored result `rid`: resolves with Q (`cached` set when it was stored).
 * Queued work is followed like an explanation: hooks {onJob(job, cancel), onProgress(job)}.
 */
export async function measure(rid, metric, params = {}, hooks = {}) {
  const r = await patiently(() => request("POST", base(rid), { metric, params }));
  if (r.status === 200) return { ...r.data.quality, cached: !!r.data.cached };
  const final = await followSubmitted(r.data.job, hooks);
  return { ...final.result, cached: false };
}
