// Small DOM and formatting helpers. No innerHTML anywhere: text goes in as text.

const SVG_NS = 'http://www.w3.org/2000/svg';

// h('div.card#id', {attrs, on: {click}}, ...children) -> Element
const isProps = (p) => p != null && typeof p === 'object' && !(p instanceof Node) && !Array.isArray(p);

export function h(tag, props, ...children) {
  if (props != null && !isProps(props)) { children.unshift(props); props = null; }
  const m = /^([a-z0-9]+)((?:[.#][\w-]+)*)$/i.exec(tag);
  const el = document.createElement(m ? m[1] : tag);
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === '.') el.classList.add(part.slice(1)); else el.id = part.slice(1);
    }
  }
  applyProps(el, props);
  append(el, children);
  return el;
}

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v != null) el.setAttribute(k, String(v));
  append(el, children);
  return el;
}

function applyProps(el, props) {
  if (!props) return;
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'on') { for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn); }
    else if (k === 'class') el.className = Array.isArray(v) ? v.filter(Boolean).join(' ') : v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'text') el.textContent = v;
    else if (k in el && typeof v !== 'string' && k !== 'list') el[k] = v;
    else if (k === 'value' || k === 'checked' || k === 'selected' || k === 'disabled' || k === 'hidden') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) { while (el.firstChild) el.firstChild.remove(); return el; }

export function replace(el, ...children) { clear(el); return append(el, children); }

export const mono = (text, cls) => h('span', { class: ['mono', cls] }, text);

export function hostPort(host, port) {
  if (host == null) return '';
  const hs = String(host).includes(':') && !String(host).startsWith('[') ? `[${host}]` : host;
  return port == null ? hs : `${hs}:${port}`;
}

export function parseTs(ts) { const t = Date.parse(ts); return Number.isFinite(t) ? t : null; }

export function fmtTime(ts) {
  const t = parseTs(ts);
  if (t == null) return '—';
  const d = new Date(t);
  const now = new Date();
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  if (d.toDateString() === now.toDateString()) return time;
  const year = d.getFullYear() === now.getFullYear() ? undefined : 'numeric'; // another year: say which
  return `${d.toLocaleDateString([], { year, month: 'short', day: 'numeric' })} ${time}`;
}

export function fmtAgo(ts) {
  const t = parseTs(ts);
  if (t == null) return '—';
  const sec = Math.round((Date.now() - t) / 1000);
  if (sec < 0) return `in ${fmtDuration(-sec)}`;
  if (sec < 5) return 'just now';
  return `${fmtDuration(sec)} ago`;
}

export function fmtDuration(sec) {
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return `${sec}s`;
  if (sec < 3600) return `${Math.floor(sec / 60)}m ${String(sec % 60).padStart(2, '0')}s`;
  if (sec < 86400) return `${Math.floor(sec / 3600)}h ${String(Math.floor(sec % 3600 / 60)).padStart(2, '0')}m`;
  return `${Math.floor(sec / 86400)}d ${Math.floor(sec % 86400 / 3600)}h`;
}

export function clock(sec) {
  sec = Math.max(0, Math.ceil(sec));
  return `${Math.floor(sec / 60)}:${String(sec % 60).padStart(2, '0')}`;
}

export function fmtNum(n) { return n == null ? '—' : Number(n).toLocaleString(); }

export function fmtBytes(n) {
  if (n == null) return '—';
  // A no-break space: a number never wraps away from its unit.
  if (n < 1024) return `${n}\u00a0B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)}\u00a0KiB`;
  return `${(n / 1024 / 1024).toFixed(1)}\u00a0MiB`;
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

let toastTimer = null;
export function toast(message, kind = 'info') {
  const el = document.getElementById('toast');
  el.textContent = message;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, kind === 'error' ? 6000 : 2500);
}

export async function copyText(text, what = 'Copied') {
  try {
    await navigator.clipboard.writeText(text);
    toast(`${what} to the clipboard`);
  } catch {
    // Without clipboard permission: select it in a prompt-free way.
    const ta = h('textarea.offscreen', { 'aria-hidden': 'true' }, text);
    document.body.append(ta);
    ta.select();
    document.execCommand('copy');
    ta.remove();
    toast(`${what} to the clipboard`);
  }
}

export function copyButton(getText, label = 'Copy', what = 'Copied', text = 'Copy') {
  return h('button.btn.btn-ghost.btn-xs', {
    type: 'button', title: label, 'aria-label': label,
    on: { click: (e) => { e.stopPropagation(); copyText(typeof getText === 'function' ? getText() : getText, what); } },
  }, text);
}

// A word that goes with a colour (never colour alone).
export function tag(text, kind) { return h('span', { class: ['tag', `tag-${kind || text}`] }, text); }

let uid = 0;
export const nextId = (p = 'f') => `${p}${++uid}`;

// A labelled form field: label + control + hint + error slot (aria-describedby wired).
export function field(label, control, { hint, name, wide } = {}) {
  const id = control.id || nextId('fld');
  control.id = id;
  const err = h('div.field-error', { id: `${id}-err`, role: 'alert', hidden: true });
  const described = [`${id}-err`];
  let hintEl = null;
  if (hint) { hintEl = h('div.hint', { id: `${id}-hint` }, hint); described.push(`${id}-hint`); }
  control.setAttribute('aria-describedby', described.join(' '));
  const wrap = h('div', { class: ['field', wide && 'field-wide'], dataset: { field: name || '' } },
    h('label', { for: id }, label), control, hintEl, err);
  wrap.showError = (msg) => {
    err.textContent = msg || '';
    err.hidden = !msg;
    control.setAttribute('aria-invalid', msg ? 'true' : 'false');
  };
  return wrap;
}

export function select(options, value, props = {}) {
  return h('select', props, options.map(([v, t]) => h('option', { value: v, selected: v === value }, t)));
}

export function emptyState(title, body, command) {
  return h('div.empty', h('h3', title), body ? h('p', body) : null,
    command ? h('div.cmd', h('code.mono', command), copyButton(command, 'Copy command', 'Command copied')) : null);
}
