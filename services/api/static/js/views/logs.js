// Logs: a live tail (pausable) over paged history; a million rows cost one page at a time.
import { h, replace, mono, hostPort, fmtTime, tag, field, select, debounce, fmtNum } from '../util.js';
import { get } from '../api.js';
import * as live from '../live.js';
import { whyDisclosure } from '../explain.js';

const LIMIT = 100;

export function mount(root, params, query, app) {
  const filters = { container: query.get('container') || '', destination: query.get('destination') || '', result: query.get('result') || '', from_date: '', to_date: '' };
  let page = 1;
  let data = null;
  let error = null;
  let paused = false;
  let fresh = 0; // new rows held back (paused, not at rest, or not on page 1)
  let held = []; // those rows themselves, newest first (page 1; at most a page of them)
  let heldOver = false; // more arrived than a page holds: showing them re-reads page 1
  let loading = false;

  const cIn = h('input', { type: 'search', value: filters.container });
  const dIn = h('input', { type: 'search', value: filters.destination });
  const rSel = select([['', 'any'], ['allowed', 'allowed'], ['blocked', 'blocked']], filters.result);
  const fromIn = h('input', { type: 'datetime-local' });
  const toIn = h('input', { type: 'datetime-local' });
  const pauseBtn = h('button.btn.btn-sm', { type: 'button', 'aria-pressed': 'false', on: { click: () => togglePause() } }, 'Pause');
  // Above the table, over it rather than in the flow: it appearing moves nothing.
  const newBar = h('div.newbar.floating', { hidden: true });
  const bodyHost = h('div.master');
  const tableHost = h('div.tail', newBar, bodyHost);
  // The table is built once; rows are kept by id, so a re-render moves nothing that stays and
  // an open "Why?" stays open (with its answer).
  const tbody = h('tbody');
  const tableWrap = h('div.table-wrap', h('table.grid', { 'aria-label': 'Log entries' },
    h('thead', h('tr', ['Time', 'Result', 'Container', 'Destination', 'Method', 'Reason', 'Rule', 'ms'].map((t) => h('th', { scope: 'col', class: t === 'ms' ? 'num' : null }, t)))),
    tbody));
  const pager = h('div.pager');
  let rows = new Map(); // log id -> <tr>
  const onFilter = debounce(() => {
    Object.assign(filters, {
      container: cIn.value.trim(), destination: dIn.value.trim(), result: rSel.value,
      from_date: fromIn.value ? new Date(fromIn.value).toISOString().replace(/\.\d+Z$/, 'Z') : '',
      to_date: toIn.value ? new Date(toIn.value).toISOString().replace(/\.\d+Z$/, 'Z') : '',
    });
    goPage(1);
  }, 250);
  for (const el of [cIn, dIn]) el.addEventListener('input', onFilter);
  for (const el of [rSel, fromIn, toIn]) el.addEventListener('change', onFilter);

  replace(root, h('div.view',
    h('div.view-head', h('h1', 'Logs'), h('div.tools', h('span.live-note.muted.small', { role: 'status' }), pauseBtn)),
    h('div.filters', field('Container', cIn), field('Destination', dIn), field('Result', rSel), field('From', fromIn), field('To', toIn)),
    tableHost));
  const note = root.querySelector('.live-note');

  // New rows may slot in on top only while the person is at the very top with no "Why?" open;
  // else they wait behind "N new".
  function atRest() {
    return tableWrap.scrollTop <= 0 && root.scrollTop <= 0 && !tbody.querySelector('details[open]');
  }

  function togglePause() {
    paused = !paused;
    pauseBtn.textContent = paused ? 'Resume' : 'Pause';
    pauseBtn.setAttribute('aria-pressed', String(paused));
    if (!paused && fresh && page === 1 && atRest()) flush();
    renderNote();
  }

  // The held rows on top of page 1 (or page 1 read again when they are more than a page).
  function flush() {
    if (heldOver || page !== 1 || !data) { page = 1; load(); return; }
    data.items = [...held, ...data.items].slice(0, LIMIT);
    data.total += held.length;
    data.pages = Math.max(1, Math.ceil(data.total / LIMIT));
    held = [];
    fresh = 0;
    scheduleRender();
  }

  // "N new — show": to the top, with them.
  function showNew() {
    if (paused) { paused = false; pauseBtn.textContent = 'Pause'; pauseBtn.setAttribute('aria-pressed', 'false'); }
    tableWrap.scrollTop = 0;
    root.scrollTop = 0;
    flush();
  }

  // Rows that arrive while a load is in flight: its list may have been read before them, so the
  // ones newer than all it holds go on top of it (page 1, live) or count as new rows held back.
  let during = null;
  async function load() {
    loading = true;
    const seen = during = new Map(); // id -> row
    try {
      data = await get('logs', { ...filters, limit: LIMIT, offset: (page - 1) * LIMIT });
      error = null;
      const top = data.items.reduce((m, l) => Math.max(m, Number(l.id) || 0), 0);
      const missed = [...seen.values()].filter((l) => Number(l.id) > top).sort((a, b) => b.id - a.id).slice(0, LIMIT);
      fresh = 0;
      held = [];
      heldOver = false;
      if (page === 1 && !paused) {
        data.items = [...missed, ...data.items].slice(0, LIMIT);
        data.total += missed.length;
        data.pages = Math.max(1, Math.ceil(data.total / LIMIT));
      } else {
        fresh = missed.length;
        if (page === 1) held = missed;
      }
    } catch (e) { error = e.message; }
    if (during === seen) during = null;
    loading = false;
    render();
  }

  function matches(l) {
    if (filters.container && !String(l.container_name).includes(filters.container)) return false;
    if (filters.destination && ![l.destination_host, l.resolved_hostname].some((v) => v && String(v).includes(filters.destination))) return false;
    if (filters.result && l.result !== filters.result) return false;
    if (filters.to_date) return false; // a fixed window: live rows are after it
    return true;
  }

  function onLog(l) {
    if (!matches(l)) return;
    if (during) during.set(l.id, l);
    if (!data || loading) return; // the load in flight takes it (above)
    fresh += 1;
    if (page === 1) {
      held.unshift(l);
      if (held.length > LIMIT) { held.pop(); heldOver = true; }
      if (!paused && atRest()) { flush(); return; }
    }
    renderNote();
  }

  function renderNote() {
    note.textContent = paused ? 'paused' : page === 1 ? 'live' : 'live on page 1';
    newBar.hidden = !fresh;
    if (fresh) {
      replace(newBar, h('button.btn.btn-sm', { type: 'button', on: { click: showNew } },
        `${fmtNum(fresh)} new — show`));
    }
  }

  let frame = 0;
  function scheduleRender() { if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); }); }

  function rowFor(l) {
    const go = () => app.navigate(`transactions?container=${encodeURIComponent(l.container_name)}&destination=${encodeURIComponent(l.destination_host)}`);
    return h('tr.clickable', { tabindex: '0', title: 'Show the transactions of this container and host', dataset: { id: l.id }, on: { click: go, keydown: (e) => { if (e.key === 'Enter') go(); } } },
      h('td.nowrap', { title: l.timestamp }, fmtTime(l.timestamp)),
      h('td', tag(l.result)),
      h('td.cname', { title: l.container_name }, mono(l.container_name)),
      h('td.dname', mono(hostPort(l.destination_host, l.destination_port)), l.resolved_hostname ? h('div.muted.small.mono', l.resolved_hostname) : null),
      h('td', mono(l.method)),
      h('td', l.reason || '', l.mitm_skip_reason ? h('div.muted.small', `mitm: ${l.mitm_skip_reason}`) : null,
        l.destination_host && l.destination_port && l.method !== 'DNS'
          ? whyDisclosure(l.container_name, l.destination_host, l.destination_port, l.resolved_hostname) : null),
      h('td.small.dname', l.rule_summary ? mono(l.rule_summary) : (l.rule_id ? `#${l.rule_id}` : '—')),
      h('td.num', l.response_time_ms == null ? '—' : String(l.response_time_ms)));
  }

  function render() {
    renderNote();
    if (error && !data) { replace(bodyHost, h('div.error', { role: 'alert' }, error)); return; }
    if (!data) { replace(bodyHost, h('p.muted', 'Loading…')); return; }
    if (!data.items.length) {
      replace(bodyHost, h('div.empty', h('h3', 'No log entries match.'), h('p', 'Each connection through the proxy is logged here as it is decided.')));
      return;
    }
    if (!bodyHost.contains(tableWrap)) replace(bodyHost, tableWrap, pager);
    // Rows in order, each one kept from the last render when it was there: only the new ones
    // are inserted, only the gone ones removed.
    const next = new Map();
    const want = data.items.map((l) => {
      const tr = next.get(l.id) || rows.get(l.id) || rowFor(l);
      next.set(l.id, tr);
      return tr;
    });
    rows = next;
    want.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
    while (tbody.children.length > want.length) tbody.lastElementChild.remove();
    const pages = data.pages || Math.max(1, Math.ceil(data.total / LIMIT));
    replace(pager, `${fmtNum(data.total)} ${data.total === 1 ? 'entry' : 'entries'} · page ${fmtNum(page)} of ${fmtNum(pages)}`,
      h('button.btn.btn-sm', { type: 'button', disabled: page <= 1, on: { click: () => goPage(1) } }, 'Newest'),
      h('button.btn.btn-sm', { type: 'button', disabled: page <= 1, on: { click: () => goPage(page - 1) } }, 'Newer'),
      h('button.btn.btn-sm', { type: 'button', disabled: page >= pages, on: { click: () => goPage(page + 1) } }, 'Older'),
      h('button.btn.btn-sm', { type: 'button', disabled: page >= pages, on: { click: () => goPage(pages) } }, 'Oldest'));
  }

  function goPage(n) {
    page = n;
    tableWrap.scrollTop = 0;
    load();
  }

  const offs = [live.on('log.new', onLog), live.on('resync', load)];
  render();
  load();
  return { unmount() { offs.forEach((o) => o()); cancelAnimationFrame(frame); } };
}
