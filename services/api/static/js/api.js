// REST calls: JSON in, JSON out; a failure is an ApiError carrying the API's own message.

const FACTS = JSON.parse(document.querySelector('meta[name="greyproxy"]')?.content || '{}');
export const facts = FACTS;
export const base = new URL(document.baseURI).pathname; // the path prefix, ending in '/'

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
  get notAvailable() { return this.status === 404 || this.status === 405; }
}

export function apiUrl(path, params) {
  const url = new URL(`api/${path.replace(/^\//, '')}`, document.baseURI);
  if (params) {
    for (const [k, v] of Object.entries(params)) {
      if (v !== '' && v != null && v !== false) url.searchParams.set(k, String(v));
    }
  }
  return url;
}

export async function api(method, path, { params, body, signal } = {}) {
  const init = { method, headers: { Accept: 'application/json' }, signal, cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(apiUrl(path, params), init);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'the API is not reachable');
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = { error: text.slice(0, 200) }; }
  }
  if (!resp.ok) {
    throw new ApiError(resp.status, (data && data.error) || `${resp.status} ${resp.statusText}`, data);
  }
  return data;
}

export const get = (path, params, signal) => api('GET', path, { params, signal });
export const post = (path, body) => api('POST', path, { body: body ?? {} });
export const put = (path, body) => api('PUT', path, { body });
export const del = (path) => api('DELETE', path);

// Which routes this API serves, from its own OpenAPI document (read once): a view built for a
// route that another version may lack asks here first instead of provoking a 404.
let served = null;
export function servedPaths() {
  if (!served) {
    served = get('openapi.json')
      .then((doc) => new Set(Object.keys(doc.paths || {}).map((p) => p.replace(/^\/api\//, '').replace(/\{[^}]+\}/g, '{}'))))
      .catch(() => null);
  }
  return served;
}

// GET that tells "this route is not in this version" (404) apart from other failures.
export async function getOptional(path, params) {
  const paths = await servedPaths();
  if (paths) {
    if (!paths.has(path.split('/')[0])) return { missing: true }; // the area's collection route

  }
  try {
    return { data: await get(path, params) };
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return { missing: true };
    throw e;
  }
}
