// The shell: router, top bar (health, silent mode, live state), navigation, theme, shortcuts.
import { h, s, replace, clock, toast } from './util.js';
import { get, del, base, ApiError } from './api.js';
import * as live from './live.js';

const VIEWS = {
  overview: () => import('./views/overview.js'),
  pending: () => import('./views/pending.js'),
  rules: () => import('./views/rules.js'),
  logs: () => import('./views/logs.js'),
  transactions: () => import('./views/transactions.js'),
  conversations: () => import('./views/conversations.js'),
  settings: () => import('./views/settings.js'),
};
const TITLES = {
  overview: 'Overview', pending: 'Pending', rules: 'Rules', logs: 'Logs', transactions: 'Transactions',
  conversations: 'Conversations', settings: 'Settings',
};
const ICONS = {
  overview: 'M3 13h8V3H3zm10 8h8V11h-8zM3 21h8v-6H3zm10-18v6h8V3z',
  pending: 'M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20zm1 11h-5v-2h3V6h2z',
  rules: 'M4 5h16v2H4zm0 6h16v2H4zm0 6h10v2H4z',
  logs: 'M4 4h16v2H4zm0 4h12v2H4zm0 4h16v2H4zm0 4h12v2H4z',
  transactions: 'M7 7h11l-3-3 1.4-1.4L22 8l-5.6 5.4L15 12l3-3H7zm10 10H6l3 3-1.4 1.4L2 16l5.6-5.4L9 12l-3 3h11z',
  conversations: 'M4 4h16v12H7l-3 3zm3 4v2h10V8zm0 4v0h7v-2H7z',
  settings: 'M12 8a4 4 0 1 0 0 8 4 4 0 0 0 0-8zm9 3h-2.1a7 7 0 0 0-1-2.5l1.5-1.5-1.4-1.4-1.5 1.5a7 7 0 0 0-2.5-1V3h-2v2.1a7 7 0 0 0-2.5 1L8 4.6 6.6 6l1.5 1.5a7 7 0 0 0-1 2.5H5v2h2.1a7 7 0 0 0 1 2.5L6.6 16 8 17.4l1.5-1.5a7 7 0 0 0 2.5 1V19h2v-2.1a7 7 0 0 0 2.5-1l1.5 1.5 1.4-1.4-1.5-1.5a7 7 0 0 0 1-2.5H21z',
};
const PROCESSES = ['bus', 'proxy', 'api', 'recorder', 'maintenance'];

export const app = {
  pendingCount: 0,
  health: null,
  allowall: null,
  settings: null,
  navigate,
};

// ------------------------------------------------------------------ theme

export function applyTheme(theme) {
  const t = ['light', 'dark', 'system'].includes(theme) ? theme : 'system';
  document.documentElement.dataset.theme = t;
  try { localStorage.setItem('greyproxy.theme', t); } catch { /* private mode */ }
}
applyTheme((() => { try { return localStorage.getItem('greyproxy.theme'); } catch { return null; } })());

// ------------------------------------------------------------------ router

let current = null; // {name, instance}
let navSeq = 0;

function parsePath() {
  const url = new URL(location.href);
  let rel = url.pathname.startsWith(base) ? url.pathname.slice(base.length) : url.pathname.replace(/^\//, '');
  if (base.length > 1 && url.pathname === base.slice(0, -1)) rel = '';
  const parts = rel.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, query: url.searchParams };
}

export function navigate(path, { replace: rep = false } = {}) {
  const url = new URL(path, document.baseURI);
  if (url.href === location.href) { route(); return; }
  if (rep) history.replaceState(null, '', url); else history.pushState(null, '', url);
  route();
}

async function route() {
  const seq = ++navSeq;
  const { parts, query } = parsePath();
  let name = parts[0] || '';
  let params = parts.slice(1);
  if (!name) {
    if (query.has('pending')) { name = 'pending'; params = [query.get('pending')]; }
    else {
      // The home: the pending queue when anything waits, else the overview.
      try { app.pendingCount = (await get('pending/count')).count; } catch { /* shown elsewhere */ }
      if (seq !== navSeq) return;
      name = app.pendingCount > 0 ? 'pending' : 'overview';
    }
  }
  if (!VIEWS[name]) name = 'notfound';
  if (current && current.instance && current.instance.update && current.name === name) {
    current.instance.update(params, query);
    markNav(name);
    return;
  }
  if (current && current.instance && current.instance.unmount) current.instance.unmount();
  current = { name, instance: null };
  markNav(name);
  const main = document.getElementById('main');
  if (name === 'notfound') {
    replace(main, h('div.pad', h('h1', 'Not found'), h('p', 'This page does not exist. ', h('a', { href: './', 'data-link': '' }, 'Go to the dashboard'), '.')));
    setTitle('Not found');
    return;
  }
  let mod;
  try { mod = await VIEWS[name](); } catch (e) { replace(main, h('p.pad.error', `Could not load the view: ${e.message}`)); return; }
  if (seq !== navSeq) return;
  replace(main);
  main.dataset.view = name;
  setTitle(TITLES[name]);
  current.instance = mod.mount(main, params, query, app) || {};
}

function markNav(name) {
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.view === name) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
}

let viewTitle = 'Overview';
function setTitle(t) { viewTitle = t; renderTitle(); }
function renderTitle() {
  const n = app.pendingCount;
  document.title = `${n > 0 ? `(${n}) ` : ''}Greyproxy — ${viewTitle}`;
}

// ------------------------------------------------------------------ pending count

async function refreshPendingCount() {
  try { app.pendingCount = (await get('pending/count')).count; } catch { return; }
  renderPendingCount();
}
function renderPendingCount() {
  const badge = document.getElementById('pending-badge');
  badge.hidden = !(app.pendingCount > 0);
  badge.textContent = app.pendingCount > 999 ? '999+' : String(app.pendingCount);
  badge.setAttribute('aria-label', `${app.pendingCount} waiting`);
  document.querySelector('#nav a[data-view="pending"]').classList.toggle('has-pending', app.pendingCount > 0);
  renderTitle();
  document.dispatchEvent(new CustomEvent('gp:pending-count', { detail: app.pendingCount }));
}
let countTimer = null;
function pendingChanged() { clearTimeout(countTimer); countTimer = setTimeout(refreshPendingCount, 120); }

// ------------------------------------------------------------------ health

// Health is read once (at start, after a reconnect, when the tab comes back) and then follows the
// API's `health.changed` events on /ws: no polling while the socket is up (SPEC §11).
let healthSeq = 0;
export async function refreshHealth() {
  const seq = ++healthSeq;
  let body;
  try { body = await get('health'); } catch (e) { body = e instanceof ApiError ? e.body : null; }
  if (seq !== healthSeq) return app.health; // a newer read was started meanwhile: it decides
  setHealth(body);
  return body;
}
function setHealth(body) {
  app.health = body;
  renderHealth();
  document.dispatchEvent(new CustomEvent('gp:health', { detail: body }));
}
function onHealthEvent(body) {
  healthSeq++; // (a read still on its way is older than this)
  setHealth(body);
}
function onVisibility() {
  if (document.visibilityState !== 'hidden' && live.getState() === 'connected') refreshHealth();
}
function renderHealth() {
  const el = document.getElementById('health');
  const services = (app.health && app.health.services) || {};
  replace(el, PROCESSES.map((p) => {
    const svc = services[p];
    const up = svc ? !!svc.up : null;
    const label = `${p}: ${up == null ? 'unknown' : up ? 'up' : (svc.state || 'down')}`;
    return h('span', { class: ['hdot', up == null ? 'unknown' : up ? 'up' : 'down'], title: label, 'aria-label': label, role: 'img' },
      h('span.hname', p));
  }));
}

// ------------------------------------------------------------------ silent mode

let silentTick = null;
export function setAllowall(status) {
  app.allowall = status;
  if (status && status.active && status.remaining_seconds != null) {
    status._endsAt = Date.now() + status.remaining_seconds * 1000;
  }
  renderSilent();
  document.dispatchEvent(new CustomEvent('gp:allowall', { detail: status }));
}
function renderSilent() {
  const el = document.getElementById('silent');
  const st = app.allowall;
  clearInterval(silentTick);
  if (!st || !st.active) { el.hidden = true; replace(el); return; }
  el.hidden = false;
  const left = h('span.mono.countdown');
  const tick = () => {
    if (st._endsAt == null) { left.textContent = 'until restart'; return; }
    const sec = (st._endsAt - Date.now()) / 1000;
    left.textContent = sec > 0 ? `${clock(sec)} left` : 'ending…';
  };
  tick();
  if (st._endsAt != null) silentTick = setInterval(tick, 1000);
  replace(el,
    h('span.silent-icon', { 'aria-hidden': 'true' }, '◐'),
    h('strong', `Silent mode: ${st.mode === 'deny' ? 'deny all' : 'allow all'}`),
    h('span.muted-inv', 'rules and the pending queue are bypassed'),
    left,
    h('button.btn.btn-sm.btn-on-violet', {
      type: 'button',
      on: { click: async () => { try { setAllowall(await del('allowall')); } catch (e) { toast(e.message, 'error'); } } },
    }, 'Cancel silent mode'));
}

// ------------------------------------------------------------------ live state

function renderLive(state, info) {
  const el = document.getElementById('live');
  el.dataset.state = state;
  el.querySelector('.label').textContent = state === 'connected' ? 'live' : state === 'connecting' ? 'connecting' : 'reconnecting';
  const banner = document.getElementById('offline');
  if (state === 'reconnecting') {
    banner.hidden = false;
    const sec = Math.max(0, Math.round((info.retryAt - Date.now()) / 1000));
    replace(banner, h('strong', 'Disconnected — retrying'), h('span', sec > 0 ? ` (next try in ${sec}s). ` : '. '),
      h('span', 'What you see may be out of date. '),
      h('button.btn.btn-sm', { type: 'button', on: { click: () => live.retryNow() } }, 'Retry now'));
  } else {
    banner.hidden = true;
  }
}

// ------------------------------------------------------------------ keyboard

let gPrefix = 0;
const G_KEYS = { o: 'overview', p: 'pending', r: 'rules', l: 'logs', t: 'transactions', c: 'conversations', s: 'settings' };
// Controls that take typed text swallow the shortcut keys; a radio, checkbox or button keeps
// them (its own keys, arrows and space, are not shortcuts).
const TEXT_INPUTS = new Set(['', 'text', 'search', 'email', 'url', 'tel', 'password', 'number',
  'date', 'datetime-local', 'month', 'week', 'time']);
export function isTyping(ev) {
  const t = ev.target;
  if (!t || !t.tagName) return false;
  if (t.isContentEditable || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT') return true;
  return t.tagName === 'INPUT' && TEXT_INPUTS.has(t.type);
}
function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || isTyping(ev)) return;
  if (ev.key === '?') { ev.preventDefault(); document.getElementById('help').showModal(); return; }
  if (gPrefix && Date.now() - gPrefix < 1500 && G_KEYS[ev.key]) {
    gPrefix = 0; ev.preventDefault(); navigate(G_KEYS[ev.key]); return;
  }
  if (ev.key === 'g') { gPrefix = Date.now(); return; }
  if (current && current.instance && current.instance.onKey) current.instance.onKey(ev);
}

// ------------------------------------------------------------------ start

function start() {
  for (const span of document.querySelectorAll('[data-icon]')) {
    span.append(s('svg', { viewBox: '0 0 24 24', 'aria-hidden': 'true', class: 'icon' }, s('path', { d: ICONS[span.dataset.icon] })));
  }
  document.addEventListener('click', (ev) => {
    const a = ev.target.closest && ev.target.closest('a[data-link]');
    if (!a || ev.button !== 0 || ev.ctrlKey || ev.metaKey || ev.shiftKey || a.target) return;
    ev.preventDefault();
    navigate(a.getAttribute('href'));
  });
  window.addEventListener('popstate', route);
  document.addEventListener('keydown', onKey);
  document.getElementById('help-btn').addEventListener('click', () => document.getElementById('help').showModal());

  live.onState(renderLive);
  setInterval(() => { if (live.getState() === 'reconnecting') renderLive('reconnecting', {}); }, 1000);
  for (const t of ['pending_request.created', 'pending_request.updated', 'pending_request.allowed', 'pending_request.dismissed']) {
    live.on(t, pendingChanged);
  }
  live.on('allowall.changed', setAllowall);
  live.on('settings.changed', (st) => { app.settings = st; if (st && st.theme) applyTheme(st.theme); });
  live.on('resync', () => { refreshPendingCount(); refreshHealth(); loadAllowall(); loadSettings(); });
  live.connect();

  refreshPendingCount();
  refreshHealth();
  live.on('health.changed', onHealthEvent);
  document.addEventListener('visibilitychange', onVisibility);
  loadAllowall();
  loadSettings();
  route();
}

async function loadAllowall() { try { setAllowall(await get('allowall')); } catch { /* proxy down: no banner */ } }
async function loadSettings() {
  try { app.settings = await get('settings'); applyTheme(app.settings.theme); } catch { /* keep the cached theme */ }
}

start();
