// Pending: the queue of unknown destinations, one key to decide, the rule spelled out first.
import { h, replace, mono, hostPort, fmtTime, fmtAgo, clock, parseTs, toast, copyButton, emptyState, debounce } from '../util.js';
import { get, post, ApiError, facts } from '../api.js';
import * as live from '../live.js';
import { VList } from '../vlist.js';
import { whyDisclosure } from '../explain.js';

const SCOPES = [
  ['exact', 'exact'],
  ['any_port', 'any port'],
  ['subdomain_wildcard', 'subdomain wildcard'],
  ['all_containers', 'all containers'],
];
// The API's durations; it has no "session" duration: "once" is a rule that expires 30 s later.
const DURATIONS = [
  ['permanent', 'permanent'],
  ['1h', '1 hour'],
  ['24h', '24 hours'],
  ['once', 'once (30 s)'],
];
const PAGE = 1000;
const MAX_READ = 20000; // entries read per listing (the list is windowed; the count is the API's)
const ROW = 64;
const HOLD = Number(facts.holdTimeout) || 30;

export function mount(root, params, query, app) {
  const state = {
    items: [], // the pending entries (groups), newest last_seen first
    total: 0,
    focus: null, // id of the focused entry
    selected: new Set(),
    choice: new Map(), // id -> {scope, duration}
    previews: new Map(), // "container|host|port" -> {scope: patterns}
    filter: '',
    loading: true,
    error: null,
    busy: new Set(),
    panelError: null,
  };
  const wanted = params[0] ? Number(params[0]) : null;
  if (wanted) state.focus = wanted;

  const countEl = h('span.count');
  const filterInput = h('input.pfilter', { type: 'search', placeholder: 'Filter by container or host', 'aria-label': 'Filter pending entries' });
  const bulkBar = h('div.bulkbar', { role: 'region', 'aria-label': 'Bulk actions', hidden: true });
  const listHost = h('div.pending-list');
  const panel = h('section.decision', { 'aria-label': 'Decision', 'aria-live': 'polite' });
  const vlist = new VList({ rowHeight: ROW, render: renderRow, label: 'Pending entries' });
  listHost.append(vlist.el);

  replace(root,
    h('div.view.pending-view',
      h('div.view-head',
        h('h1', 'Pending ', countEl),
        h('div.tools', filterInput),
      ),
      bulkBar,
      h('div.split', listHost, panel)));

  vlist.el.addEventListener('keydown', (ev) => { if (['ArrowDown', 'ArrowUp'].includes(ev.key)) { ev.preventDefault(); move(ev.key === 'ArrowDown' ? 1 : -1); } });
  filterInput.addEventListener('input', debounce(() => { state.filter = filterInput.value.trim(); load(); }, 200));

  // ---------------------------------------------------------------- data
  const keyOf = (e) => `${e.container_name}|${(e.resolved_hostname || e.destination_host || '').toLowerCase()}|${e.destination_port}`;
  const ruleHost = (e) => e.resolved_hostname || e.destination_host;

  // Live changes that arrive while a load is in flight: the list it gets may have been read before
  // them (a request held just as the page opened), so they are applied again to what it gets.
  let loadSeq = 0;
  let inflight = null; // { up: Map(id -> entry), gone: Set(id) } for the current load
  // (An entry the load's list has is left as the list says: it may have been read after the event.)
  function replay(seen) {
    for (const e of seen.up.values()) {
      if (!seen.gone.has(e.id) && !state.items.some((x) => x.id === e.id || keyOf(x) === keyOf(e))) applyUpsert(e);
    }
    for (const id of seen.gone) applyRemove(id);
  }
  // One listing read page by page (at most MAX_READ entries); `first` gets the first page.
  async function readAll(params, seq, first) {
    const out = [];
    let offset = 0;
    let total = 0;
    do {
      const page = await get('pending', { ...params, limit: PAGE, offset });
      if (seq !== loadSeq) return null;
      total = page.total;
      out.push(...page.items);
      offset += PAGE;
      if (offset === PAGE && first) first(out.slice(), total);
    } while (offset < total && offset < MAX_READ);
    return { items: out, total };
  }
  // The filter matches the container or the host: the API filters one at a time (`container`,
  // `destination`, substrings both), so a filtered list is the union of the two listings.
  function union(lists) {
    const byId = new Map();
    for (const l of lists) for (const e of l) if (!byId.has(e.id)) byId.set(e.id, e);
    return [...byId.values()].sort((a, b) => (parseTs(b.last_seen) || 0) - (parseTs(a.last_seen) || 0));
  }
  async function load() {
    const seq = ++loadSeq;
    const seen = inflight = { up: new Map(), gone: new Set() };
    state.error = null;
    const show = (items, total) => { state.items = items; state.total = total; state.loading = false; replay(seen); render(); };
    try {
      let out;
      let total;
      if (!state.filter) {
        const all = await readAll({}, seq, show);
        if (!all) return;
        ({ items: out, total } = all);
      } else {
        const [byHost, byName] = await Promise.all([
          readAll({ destination: state.filter }, seq), readAll({ container: state.filter }, seq)]);
        if (!byHost || !byName) return;
        out = union([byHost.items, byName.items]);
        // Exact when both were read whole; else the entries beyond what was read count once each.
        total = out.length + Math.max(0, byHost.total - byHost.items.length) + Math.max(0, byName.total - byName.items.length);
      }
      if (seq !== loadSeq) return;
      state.items = out;
      state.total = total;
      replay(seen);
    } catch (e) {
      if (seq !== loadSeq) return;
      state.error = e.message;
    }
    if (inflight === seen) inflight = null;
    state.loading = false;
    if (state.focus == null || !state.items.some((e) => e.id === state.focus)) state.focus = state.items[0]?.id ?? null;
    for (const id of [...state.selected]) if (!state.items.some((e) => e.id === id)) state.selected.delete(id);
    render();
    if (state.focus != null) scrollToFocus();
  }
  const reload = debounce(load, 250);

  function matchesFilter(e) {
    if (!state.filter) return true;
    const f = state.filter.toLowerCase();
    return [e.container_name, e.destination_host, e.resolved_hostname].some((v) => v && v.toLowerCase().includes(f));
  }

  function upsert(e) {
    if (!e || e.id == null || !matchesFilter(e)) return;
    if (inflight) { inflight.up.set(e.id, e); inflight.gone.delete(e.id); }
    applyUpsert(e);
    render();
  }

  function applyUpsert(e) {
    const k = keyOf(e);
    const i = state.items.findIndex((x) => x.id === e.id || keyOf(x) === k);
    if (i >= 0) {
      const prev = state.items[i];
      state.items[i] = { ...prev, ...e, id: prev.id === e.id ? e.id : prev.id, _holdStart: (e.waiting || 0) > (prev.waiting || 0) ? Date.now() : prev._holdStart };
    } else {
      state.items.unshift({ ...e, _holdStart: e.waiting ? Date.now() : null });
      state.total += 1;
      vlist.shiftBy(1);
      if (state.focus == null) state.focus = e.id;
    }
  }

  function remove(id) {
    if (inflight) { inflight.gone.add(id); inflight.up.delete(id); }
    if (!state.items.some((x) => x.id === id)) { reload(); return; } // a sibling row we do not show by that id: re-read
    applyRemove(id);
    render();
  }

  function applyRemove(id) {
    const i = state.items.findIndex((x) => x.id === id);
    if (i < 0) return;
    const wasFocus = state.focus === id;
    state.items.splice(i, 1);
    state.total = Math.max(0, state.total - 1);
    state.selected.delete(id);
    if (wasFocus) state.focus = (state.items[i] || state.items[i - 1] || {}).id ?? null;
  }

  // A key's connections count for the entry of its host, or of the name they were judged under
  // (another IP of the same host bumps that entry and has none of its own: SPEC §3.1).
  function waiters(w) {
    for (const e of state.items) {
      if (e.container_name === w.container_name && Number(e.destination_port) === Number(w.port)
          && ([e.destination_host, e.resolved_hostname].includes(w.host)
              || (w.resolved_hostname && w.resolved_hostname === (e.resolved_hostname || e.destination_host)))) {
        if (w.current_count > w.previous_count) e._holdStart = Date.now();
        e.waiting = Math.max(0, (e.waiting || 0) + (w.current_count - w.previous_count));
      }
    }
    render();
  }

  const offs = [
    live.on('pending_request.created', upsert),
    live.on('pending_request.updated', upsert),
    live.on('pending_request.allowed', (d) => remove(d.pending_id)),
    live.on('pending_request.dismissed', (d) => remove(d.pending_id)),
    live.on('waiters.changed', waiters),
    live.on('resync', load),
  ];
  // The hold clocks drain in place: only the badges change, focus and scroll stay put.
  const ticker = setInterval(() => {
    for (const row of vlist.inner.children) {
      const e = state.items.find((x) => String(x.id) === row.dataset.id);
      const w = row.querySelector('.wait');
      if (e && w && e.waiting > 0) w.replaceWith(waitBadge(e));
    }
    const e = focused();
    if (e && state.panelWait && e.waiting > 0) replace(state.panelWait, waitBadge(e));
  }, 1000);

  // ---------------------------------------------------------------- decisions
  const choiceOf = (id) => state.choice.get(id) || { scope: 'exact', duration: 'permanent' };
  const focused = () => state.items.find((e) => e.id === state.focus) || null;

  async function decide(entry, action) {
    if (!entry || state.busy.has(entry.id)) return;
    const { scope, duration } = choiceOf(entry.id);
    state.busy.add(entry.id);
    state.panelError = null;
    render();
    try {
      const out = await post(`pending/${entry.id}/${action}`, { scope, duration });
      const r = out.rule;
      toast(`${action === 'allow' ? 'Allowed' : 'Denied'}: rule #${r.id} ${r.container_pattern} → ${hostPort(r.destination_pattern, r.port_pattern)}`);
      remove(entry.id);
    } catch (e) {
      state.panelError = e.message;
      if (e instanceof ApiError && e.status === 404) remove(entry.id);
    } finally {
      state.busy.delete(entry.id);
      render();
    }
  }

  async function bulk(action) {
    const ids = [...state.selected];
    if (!ids.length) return;
    try {
      if (action === 'allow') {
        const { scope, duration } = state.bulkChoice || { scope: 'exact', duration: 'permanent' };
        const out = await post('pending/bulk-allow', { pending_ids: ids, scope, duration });
        toast(`Allowed ${out.pending_removed}: ${out.rules_created.length} rule(s)`);
      } else {
        const out = await post('pending/bulk-dismiss', { pending_ids: ids });
        toast(`Dismissed ${out.removed}`);
      }
      for (const id of ids) remove(id);
      state.selected.clear();
      render();
    } catch (e) { toast(e.message, 'error'); }
  }

  function toggleSelect(id) {
    if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
    render();
  }

  function move(delta) {
    if (!state.items.length) return;
    let i = state.items.findIndex((e) => e.id === state.focus);
    i = Math.max(0, Math.min(state.items.length - 1, (i < 0 ? 0 : i + delta)));
    state.focus = state.items[i].id;
    render();
    scrollToFocus();
  }
  function scrollToFocus() {
    const i = state.items.findIndex((e) => e.id === state.focus);
    if (i >= 0) vlist.scrollToIndex(i);
  }
  function cycle(kind) {
    const e = focused();
    if (!e) return;
    const c = { ...choiceOf(e.id) };
    const list = kind === 'scope' ? SCOPES : DURATIONS;
    const i = list.findIndex(([v]) => v === c[kind]);
    c[kind] = list[(i + 1) % list.length][0];
    state.choice.set(e.id, c);
    renderPanel();
  }

  // ---------------------------------------------------------------- rendering
  function holdLeft(e) {
    if (!(e.waiting > 0)) return null;
    const start = e._holdStart || parseTs(e.last_seen) || Date.now();
    return Math.max(0, HOLD - (Date.now() - start) / 1000);
  }

  function waitBadge(e) {
    const left = holdLeft(e);
    if (left == null) return h('span.wait.idle', 'not waiting');
    return h('span.wait', { title: 'connections held open right now, and the time left on the newest hold' },
      h('span.pulse', { 'aria-hidden': 'true' }), `waiting ${e.waiting} · ${clock(left)} left`);
  }

  function renderRow(e) {
    const isFocus = e.id === state.focus;
    const checked = state.selected.has(e.id);
    const busy = state.busy.has(e.id);
    const row = h('div', {
      class: ['prow', isFocus && 'focus', checked && 'selected'], 'aria-current': isFocus ? 'true' : null,
      dataset: { id: e.id },
      on: { click: (ev) => { if (ev.target.closest('button,input')) return; state.focus = e.id; render(); } },
    },
      h('input', { type: 'checkbox', checked, 'aria-label': `Select ${e.container_name} → ${hostPort(e.destination_host, e.destination_port)}`,
        on: { change: () => toggleSelect(e.id) } }),
      h('div.pmain',
        h('div.pline',
          h('span.mono.strong.who', { title: e.container_name }, e.container_name), h('span.arrow', { 'aria-hidden': 'true' }, '→'),
          h('span.mono.strong.dest', { title: hostPort(e.destination_host, e.destination_port) }, hostPort(e.destination_host, e.destination_port))),
        h('div.pmeta',
          e.resolved_hostname ? [h('span', 'resolved ', mono(e.resolved_hostname)), ' · '] : null,
          h('span', `first seen ${fmtTime(e.first_seen)}`), ' · ',
          h('span', `${e.attempt_count} attempt${e.attempt_count === 1 ? '' : 's'}`))),
      h('div.pside', waitBadge(e),
        h('div.btns',
          h('button.btn.btn-allow.btn-sm', { type: 'button', disabled: busy, on: { click: () => decide(e, 'allow') },
            'aria-label': `Allow ${e.container_name} to ${hostPort(e.destination_host, e.destination_port)}` }, 'Allow'),
          h('button.btn.btn-deny.btn-sm', { type: 'button', disabled: busy, on: { click: () => decide(e, 'deny') },
            'aria-label': `Deny ${e.container_name} to ${hostPort(e.destination_host, e.destination_port)}` }, 'Deny'))));
    return row;
  }

  function ensurePreview(e) {
    const k = `${e.container_name}|${ruleHost(e)}|${e.destination_port}`;
    if (state.previews.has(k)) return state.previews.get(k);
    state.previews.set(k, null);
    const url = new URL('ui/scopes', document.baseURI);
    url.search = new URLSearchParams({ container: e.container_name, host: ruleHost(e), port: String(e.destination_port) }).toString();
    fetch(url, { headers: { Accept: 'application/json' } })
      .then((r) => (r.ok ? r.json() : null))
      .then((p) => { state.previews.set(k, p || {}); renderPanel(); })
      .catch(() => state.previews.set(k, {}));
    return null;
  }

  function ruleText(action, p, duration) {
    if (!p) return '…';
    const dur = DURATIONS.find(([v]) => v === duration)?.[1] || duration;
    return `${action} ${p.container_pattern} → ${hostPort(p.destination_pattern, p.port_pattern)} (${dur})`;
  }

  function radioGroup(name, options, value, onChange, labels) {
    return h('div.radios', { role: 'radiogroup', 'aria-label': name },
      options.map(([v, t]) => {
        const id = `${name}-${v}`.replace(/\W/g, '-');
        return h('label', { class: ['radio', v === value && 'on'], for: id },
          h('input', { type: 'radio', name, id, value: v, checked: v === value, on: { change: () => onChange(v) } }),
          h('span', t), labels && labels[v] ? h('span.mono.small', labels[v]) : null);
      }));
  }

  function renderPanel() {
    const e = focused();
    if (!e) {
      replace(panel);
      panel.hidden = true;
      return;
    }
    panel.hidden = false;
    const c = choiceOf(e.id);
    const prev = ensurePreview(e);
    const p = prev ? prev[c.scope] : null;
    const labels = prev ? Object.fromEntries(SCOPES.map(([v]) => [v, prev[v] ? `${prev[v].container_pattern} → ${hostPort(prev[v].destination_pattern, prev[v].port_pattern)}` : ''])) : null;
    const busy = state.busy.has(e.id);
    const dest = hostPort(e.destination_host, e.destination_port);
    const active = panel.contains(document.activeElement) ? document.activeElement.id : null;
    replace(panel,
      h('div.dhead',
        h('div', h('span.mono.strong', e.container_name), h('span.arrow', ' → '), h('span.mono.strong', dest)),
        copyButton(dest, 'Copy destination', 'Destination copied')),
      h('dl.facts',
        h('dt', 'resolved'), h('dd.mono', e.resolved_hostname || '—'),
        h('dt', 'first seen'), h('dd', `${fmtTime(e.first_seen)} (${fmtAgo(e.first_seen)})`),
        h('dt', 'last seen'), h('dd', `${fmtTime(e.last_seen)} (${fmtAgo(e.last_seen)})`),
        h('dt', 'attempts'), h('dd', String(e.attempt_count)),
        h('dt', 'waiting'), (state.panelWait = h('dd', waitBadge(e))),
        h('dt', 'id'), h('dd.mono', String(e.id))),
      whyDisclosure(e.container_name, e.destination_host, e.destination_port, e.resolved_hostname),
      h('fieldset', h('legend', 'Scope ', h('kbd', 's')),
        radioGroup(`scope-${e.id}`, SCOPES, c.scope, (v) => { state.choice.set(e.id, { ...choiceOf(e.id), scope: v }); renderPanel(); }, labels)),
      h('fieldset', h('legend', 'Duration ', h('kbd', 't')),
        radioGroup(`duration-${e.id}`, DURATIONS, c.duration, (v) => { state.choice.set(e.id, { ...choiceOf(e.id), duration: v }); renderPanel(); })),
      h('div.preview', { 'aria-label': 'The rule each button creates' },
        h('div.will', h('span.label', 'Allow creates'), h('code.mono.rule-preview', { dataset: { action: 'allow' } }, ruleText('allow', p, c.duration))),
        h('div.will', h('span.label', 'Deny creates'), h('code.mono.rule-preview', { dataset: { action: 'deny' } }, ruleText('deny', p, c.duration)))),
      state.panelError ? h('div.error', { role: 'alert' }, state.panelError) : null,
      h('div.dactions',
        h('button.btn.btn-allow', { type: 'button', disabled: busy, on: { click: () => decide(e, 'allow') } }, 'Allow ', h('kbd', 'a')),
        h('button.btn.btn-deny', { type: 'button', disabled: busy, on: { click: () => decide(e, 'deny') } }, 'Deny ', h('kbd', 'd'))));
    if (active) document.getElementById(active)?.focus();
  }

  function renderBulk() {
    const n = state.selected.size;
    bulkBar.hidden = n === 0;
    if (!n) return;
    const bc = state.bulkChoice || { scope: 'exact', duration: 'permanent' };
    const scopeSel = h('select', { 'aria-label': 'Scope for the selected entries', on: { change: (ev) => { state.bulkChoice = { ...bc, scope: ev.target.value }; } } },
      SCOPES.map(([v, t]) => h('option', { value: v, selected: v === bc.scope }, t)));
    const durSel = h('select', { 'aria-label': 'Duration for the selected entries', on: { change: (ev) => { state.bulkChoice = { ...bc, duration: ev.target.value }; } } },
      DURATIONS.map(([v, t]) => h('option', { value: v, selected: v === bc.duration }, t)));
    replace(bulkBar,
      h('strong', `${n} selected`), scopeSel, durSel,
      h('button.btn.btn-allow.btn-sm', { type: 'button', on: { click: () => bulk('allow') } }, 'Allow selected'),
      h('button.btn.btn-sm', { type: 'button', on: { click: () => bulk('dismiss') } }, 'Dismiss selected'),
      h('button.btn.btn-ghost.btn-sm', { type: 'button', on: { click: () => { state.selected.clear(); render(); } } }, 'Clear selection'));
  }

  function render() {
    countEl.textContent = state.total ? `(${state.total.toLocaleString()})` : '';
    renderBulk();
    if (state.error && !state.items.length) {
      replace(listHost, h('div.error.pad', { role: 'alert' }, `Could not read the queue: ${state.error}`));
      panel.hidden = true;
      return;
    }
    if (!state.loading && !state.items.length) {
      const name = 'NAME';
      const port = facts.proxyPort || 43051;
      replace(listHost, state.filter
        ? emptyState('Nothing matches this filter.', 'Clear the filter to see every waiting destination.')
        : emptyState('Nothing is waiting.',
          `Point an agent at http://${name}@127.0.0.1:${port} (or run eval "$(greyproxy env --container ${name})") and its first unknown destination appears here.`,
          `eval "$(greyproxy env --container ${name})"`));
      panel.hidden = true;
      return;
    }
    if (!listHost.contains(vlist.el)) replace(listHost, vlist.el);
    vlist.setItems(state.items);
    renderPanel();
  }

  function onKey(ev) {
    const e = focused();
    switch (ev.key) {
      case 'j': move(1); break;
      case 'k': move(-1); break;
      case 'a': decide(e, 'allow'); break;
      case 'd': decide(e, 'deny'); break;
      case 'x': if (e) toggleSelect(e.id); break;
      case 's': cycle('scope'); break;
      case 't': cycle('duration'); break;
      default: return;
    }
    ev.preventDefault();
  }

  render();
  load();

  return {
    onKey,
    update(p) { if (p[0]) { state.focus = Number(p[0]); render(); scrollToFocus(); } },
    unmount() { offs.forEach((off) => off()); clearInterval(ticker); vlist.destroy(); },
  };
}
