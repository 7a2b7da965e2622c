// Transactions: filters, a paged list, and the detail of one (heads, bodies, SSE, copy as curl).
import { h, replace, mono, hostPort, fmtTime, fmtBytes, tag, field, select, debounce, fmtNum, copyButton, emptyState } from '../util.js';
import { get, apiUrl } from '../api.js';
import * as live from '../live.js';

const LIMIT = 50;
const COLLAPSE_LINES = 200;
const REDACTED = '[REDACTED]';
const PLACEHOLDER = /greyproxy:credential:v1:[A-Za-z0-9._-]{1,128}:[0-9a-f]{32}/;
const SKIP_CURL = new Set(['host', 'content-length', 'proxy-authorization', 'proxy-connection', 'connection', 'transfer-encoding', 'accept-encoding']);

const shq = (v) => `'${String(v).replace(/'/g, `'\\''`)}'`;
const envName = (header) => header.toUpperCase().replace(/[^A-Z0-9]+/g, '_').replace(/^_|_$/g, '');

// "copy as curl": what was stored, and a shell variable in place of every redacted value. Stored
// headers hold placeholders or [REDACTED], never a credential; nothing here can add one.
// The usual layout: `curl -X POST 'url' \`, then one option (with its value) a line.
export function curlCommand(t) {
  const head = ['curl'];
  if (t.method && !['GET', 'WS_REQ', 'WS_RESP'].includes(t.method)) head.push('-X', t.method);
  head.push(shq(t.url));
  const lines = [head.join(' ')];
  for (const [name, values] of Object.entries(t.request_headers || {})) {
    if (SKIP_CURL.has(name.toLowerCase())) continue;
    for (const v of values) {
      if (String(v).includes(REDACTED)) lines.push(`-H "${name}: \${${envName(name)}:?set ${envName(name)}}"`);
      else lines.push(`-H ${shq(`${name}: ${v}`)}`);
    }
  }
  if (t.request_body) lines.push(`--data-raw ${shq(t.request_body)}`);
  return lines.join(' \\\n  ');
}

function isJson(ct) { return /json/i.test(ct || ''); }
function isSse(ct) { return /text\/event-stream/i.test(ct || ''); }

export function parseSse(text) {
  const events = [];
  let ev = { event: 'message', data: [] };
  for (const raw of String(text).split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (line === '') { if (ev.data.length || ev.event !== 'message') events.push(ev); ev = { event: 'message', data: [] }; continue; }
    if (line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const k = i < 0 ? line : line.slice(0, i);
    let v = i < 0 ? '' : line.slice(i + 1);
    if (v.startsWith(' ')) v = v.slice(1);
    if (k === 'event') ev.event = v; else if (k === 'data') ev.data.push(v); else if (k === 'id') ev.id = v;
  }
  if (ev.data.length) events.push(ev);
  return events;
}

function pretty(text, ct) {
  if (!isJson(ct)) return text;
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
}

// A body: pretty-printed when JSON, shown up to 200 lines, the rest on request (a 2 MiB body
// is one text node, built only when asked for).
function bodyView(text, ct, size, label, error) {
  if (text == null || text === '') {
    if (error) return h('p.error.small', `${size ? `${fmtBytes(size)}: ` : ''}the stored body could not be read (${error})`);
    return h('p.muted.small', size ? `${fmtBytes(size)} not stored (binary or not text-like)` : 'no body');
  }
  if (isSse(ct)) {
    const events = parseSse(text);
    return h('div.sse', { 'aria-label': `${label} events` }, h('div.muted.small', `${events.length} server-sent events`),
      events.slice(0, 500).map((e) => {
        const data = e.data.join('\n');
        return h('div.ev', h('span.name', e.event), ' ', pretty(data, /^[[{]/.test(data) ? 'json' : ''));
      }),
      events.length > 500 ? h('p.muted.small', `${events.length - 500} more events not shown`) : null);
  }
  const full = pretty(text, ct);
  let cut = -1;
  let n = 0;
  for (let i = 0; i < full.length; i++) { if (full.charCodeAt(i) === 10 && ++n === COLLAPSE_LINES) { cut = i; break; } }
  const pre = h('pre.body', { tabindex: '0', 'aria-label': label }, cut < 0 ? full : full.slice(0, cut));
  const wrap = h('div', pre);
  if (cut >= 0) {
    const total = full.split('\n').length;
    const more = h('button.btn.btn-sm', { type: 'button', on: { click: () => { pre.textContent = full; more.remove(); } } },
      `Show all ${fmtNum(total)} lines`);
    wrap.append(more);
  }
  wrap.prepend(h('div.card-head', h('span.muted.small', `${ct || 'no content type'} · ${fmtBytes(size)}`), copyButton(() => full, `Copy ${label}`, 'Body copied')));
  return wrap;
}

function headsView(headers, label) {
  const rows = Object.entries(headers || {}).flatMap(([k, vs]) => vs.map((v) => h('tr', h('td', k), h('td', { class: String(v).includes(REDACTED) ? 'redacted' : null }, v))));
  if (!rows.length) return h('p.muted.small', 'no headers');
  return h('table.heads', { 'aria-label': label }, h('tbody', rows));
}

export function mount(root, params, query, app) {
  const filters = { container: query.get('container') || '', destination: query.get('destination') || '', method: query.get('method') || '' };
  let page = 1;
  let data = null;
  let error = null;
  let selected = params[0] ? Number(params[0]) : null;
  let fresh = 0;

  const cIn = h('input', { type: 'search', value: filters.container });
  const dIn = h('input', { type: 'search', value: filters.destination });
  const mSel = select([['', 'any'], ...['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS', 'WS_REQ', 'WS_RESP'].map((m) => [m, m])], filters.method);
  const onFilter = debounce(() => { Object.assign(filters, { container: cIn.value.trim(), destination: dIn.value.trim(), method: mSel.value }); renderHarLink(); page = 1; load(); }, 250);
  for (const el of [cIn, dIn]) el.addEventListener('input', onFilter);
  mSel.addEventListener('change', onFilter);

  const listHost = h('div.master');
  const detailHost = h('section.detail', { 'aria-label': 'Transaction detail', hidden: true });
  const md = h('div.master-detail', listHost, detailHost);
  const newBar = h('div.newbar', { hidden: true });
  // SPEC §14: the filtered list as HAR 1.2 (every match, not only this page), from the API
  // under the path prefix.
  const harLink = h('a.btn.btn-sm', { download: 'greyproxy-transactions.har', title: 'Download every transaction these filters match, as HAR 1.2' }, 'Export HAR');
  function renderHarLink() {
    const url = apiUrl('transactions/export.har', filters);
    harLink.setAttribute('href', url.pathname + url.search);
  }
  renderHarLink();
  replace(root, h('div.view',
    h('div.view-head', h('h1', 'Transactions'), h('div.tools', harLink)),
    h('div.filters', field('Container', cIn), field('Destination', dIn), field('Method', mSel)),
    newBar, md));

  async function load() {
    try { data = await get('transactions', { ...filters, limit: LIMIT, offset: (page - 1) * LIMIT }); error = null; fresh = 0; } catch (e) { error = e.message; }
    renderList();
  }

  async function loadDetail() {
    md.classList.toggle('closed', !selected);
    detailHost.hidden = !selected;
    if (!selected) return;
    replace(detailHost, h('p.muted', 'Loading…'));
    let t;
    try { t = await get(`transactions/${selected}`); } catch (e) {
      replace(detailHost, h('div.error', { role: 'alert' }, e.status === 404 ? `Transaction ${selected} does not exist (or was pruned).` : e.message));
      return;
    }
    const ws = t.method === 'WS_REQ' || t.method === 'WS_RESP';
    replace(detailHost,
      h('div.card-head', h('h2', h('span.mono', ws ? (t.method === 'WS_REQ' ? '→ client to server' : '← server to client') : t.method), ' ', h('span.mono', t.url)),
        h('button.btn.btn-ghost.btn-sm', { type: 'button', 'aria-label': 'Close the detail', on: { click: () => app.navigate(`transactions${location.search}`) } }, 'Close')),
      h('div.form-row',
        tag(t.result), t.status_code != null ? tag(String(t.status_code), t.status_code < 400 ? 'info' : 'blocked') : null,
        h('span.muted.small', `${fmtTime(t.timestamp)} · ${t.duration_ms ?? '—'} ms · ${t.container_name} → ${hostPort(t.destination_host, t.destination_port)}`),
        t.rule_id ? h('a.small', { href: `rules`, 'data-link': '' }, `rule #${t.rule_id}`) : null,
        t.conversation_id ? h('a.small', { href: `conversations/${encodeURIComponent(t.conversation_id)}`, 'data-link': '' }, 'conversation') : null),
      (t.substituted_credentials || []).length ? h('div.small', 'Credentials substituted: ', h('span.chips', t.substituted_credentials.map((l) => h('span.chip', l)))) : null,
      t.host_mismatch ? h('div.error.small', `Host header ${t.request_host} differs from the host contacted`) : null,
      ws ? null : h('div.form-row', copyButton(() => curlCommand(t), 'Copy as curl', 'curl command copied', 'Copy as curl'), h('span.muted.small', 'placeholders and redacted values stay placeholders')),
      ws ? null : h('section', h('h3', 'Request headers'), headsView(t.request_headers, 'Request headers')),
      h('section', h('h3', ws ? 'Message' : 'Request body'), bodyView(ws ? (t.request_body ?? t.response_body) : t.request_body, t.request_content_type || (ws ? 'json' : ''), ws ? (t.request_body_size || t.response_body_size) : t.request_body_size, ws ? 'message' : 'request body', t.request_body_error || (ws ? t.response_body_error : null))),
      ws ? null : h('section', h('h3', 'Response headers'), headsView(t.response_headers, 'Response headers')),
      ws ? null : h('section', h('h3', 'Response body'), bodyView(t.response_body, t.response_content_type, t.response_body_size, 'response body', t.response_body_error)));
  }

  function renderList() {
    newBar.hidden = !fresh;
    if (fresh) replace(newBar, h('button.btn.btn-sm', { type: 'button', on: { click: () => { page = 1; load(); } } }, `${fmtNum(fresh)} new — show`));
    if (error && !data) { replace(listHost, h('div.error', { role: 'alert' }, error)); return; }
    if (!data) { replace(listHost, h('p.muted', 'Loading…')); return; }
    if (!data.items.length) {
      replace(listHost, emptyState('No transactions recorded.', 'HTTPS is recorded once the CA exists (Settings → Certificate) and the client trusts it; plain HTTP through the proxy is recorded as it is.', 'greyproxy cert generate && greyproxy cert install'));
      return;
    }
    const pages = data.pages || 1;
    replace(listHost,
      h('div.table-wrap', h('table.grid', { 'aria-label': 'Transactions' },
        h('thead', h('tr', ['Time', 'Method', 'Status', 'URL', 'Container', 'Size', 'ms'].map((c) => h('th', { scope: 'col', class: ['Size', 'ms'].includes(c) ? 'num' : null }, c)))),
        h('tbody', data.items.map((t) => {
          const go = () => app.navigate(`transactions/${t.id}${location.search}`);
          return h('tr.clickable', { tabindex: '0', 'aria-selected': String(t.id === selected), dataset: { id: t.id }, on: { click: go, keydown: (e) => { if (e.key === 'Enter') go(); } } },
            h('td.nowrap', fmtTime(t.timestamp)),
            h('td', mono(t.method)),
            h('td', t.status_code == null ? '—' : mono(String(t.status_code), t.status_code >= 400 ? 'bad' : null)),
            h('td.ellipsis.mono', { title: t.url }, t.url),
            h('td.cname', { title: t.container_name }, mono(t.container_name)),
            h('td.num', fmtBytes(t.response_body_size)),
            h('td.num', t.duration_ms == null ? '—' : String(t.duration_ms)));
        })))),
      h('div.pager', `${fmtNum(data.total)} transaction${data.total === 1 ? '' : 's'} · page ${page} of ${pages}`,
        h('button.btn.btn-sm', { type: 'button', disabled: page <= 1, on: { click: () => { page -= 1; load(); } } }, 'Newer'),
        h('button.btn.btn-sm', { type: 'button', disabled: page >= pages, on: { click: () => { page += 1; load(); } } }, 'Older')));
  }

  const offs = [
    live.on('transaction.new', () => { fresh += 1; if (page === 1 && data && data.items.length < LIMIT && fresh < 5) load(); else renderList(); }),
    live.on('resync', () => { load(); loadDetail(); }),
  ];
  renderList();
  load();
  loadDetail();
  return {
    update(p) { selected = p[0] ? Number(p[0]) : null; loadDetail(); renderList(); },
    unmount() { offs.forEach((o) => o()); },
  };
}
