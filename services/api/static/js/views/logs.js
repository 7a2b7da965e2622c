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
  let fresh = 0; // new rows held back (paused, or not on page 1)
  let loading = false;

  const cIn = h('input', { type: 'search', value: filters.container });
  const dIn = h('input', { type: 'search', value: filters.destination });
  const rSel = select([['', 'any'], ['allowed', 'allowed'], ['blocked', 'blocked']], filters.result);
  const fromIn = h('input', { type: 'datetime-local' });
  const toIn = h('input', { type: 'datetime-local' });
  const pauseBtn = h('button.btn.btn-sm', { type: 'button', 'aria-pressed': 'false', on: { click: () => togglePause() } }, 'Pause');
  const newBar = h('div.newbar', { hidden: true });
  const tableHost = h('div.master');
  const onFilter = debounce(() => {
    Object.assign(filters, {
      container: cIn.value.trim(), destination: dIn.value.trim(), result: rSel.value,
      from_date: fromIn.value ? new Date(fromIn.value).toISOString().replace(/\.\d+Z$/, 'Z') : '',
      to_date: toIn.value ? new Date(toIn.value).toISOString().replace(/\.\d+Z$/, 'Z') : '',
    });
    page = 1; load();
  }, 250);
  for (const el of [cIn, dIn]) el.addEventListener('input', onFilter);
  for (const el of [rSel, fromIn, toIn]) el.addEventListener('change', onFilter);

  replace(root, h('div.view',
    h('div.view-head', h('h1', 'Logs'), h('div.tools', h('span.live-note.muted.small', { role: 'status' }), pauseBtn)),
    h('div.filters', field('Container', cIn), field('Destination', dIn), field('Result', rSel), field('From', fromIn), field('To', toIn)),
    newBar, tableHost));
  const note = root.querySelector('.live-note');

  function togglePause() {
    paused = !paused;
    pauseBtn.textContent = paused ? 'Resume' : 'Pause';
    pauseBtn.setAttribute('aria-pressed', String(paused));
    if (!paused && fresh) { page = 1; load(); }
    renderNote();
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
      if (page === 1 && !paused) {
        data.items = [...missed, ...data.items].slice(0, LIMIT);
        data.total += missed.length;
        data.pages = Math.max(1, Math.ceil(data.total / LIMIT));
      } else {
        fresh = missed.length;
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
    if (!data) return;
    if (paused || page !== 1 || loading) { fresh += 1; renderNote(); return; }
    data.items = [l, ...data.items].slice(0, LIMIT);
    data.total += 1;
    data.pages = Math.max(1, Math.ceil(data.total / LIMIT));
    scheduleRender();
  }

  function renderNote() {
    note.textContent = paused ? 'paused' : page === 1 ? 'live' : 'live on page 1';
    newBar.hidden = !fresh;
    if (fresh) {
      replace(newBar, h('button.btn.btn-sm', { type: 'button', on: { click: () => { if (paused) togglePause(); else { page = 1; load(); } } } },
        `${fmtNum(fresh)} new — show`));
    }
  }

  let frame = 0;
  function scheduleRender() { if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); }); }

  function render() {
    renderNote();
    if (error && !data) { replace(tableHost, h('div.error', { role: 'alert' }, error)); return; }
    if (!data) { replace(tableHost, h('p.muted', 'Loading…')); return; }
    if (!data.items.length) {
      replace(tableHost, h('div.empty', h('h3', 'No log entries match.'), h('p', 'Each connection through the proxy is logged here as it is decided.')));
      return;
    }
    const pages = data.pages || Math.max(1, Math.ceil(data.total / LIMIT));
    replace(tableHost,
      h('div.table-wrap', h('table.grid', { 'aria-label': 'Log entries' },
        h('thead', h('tr', ['Time', 'Result', 'Container', 'Destination', 'Method', 'Reason', 'Rule', 'ms'].map((t) => h('th', { scope: 'col', class: t === 'ms' ? 'num' : null }, t)))),
        h('tbody', data.items.map((l) => {
          const go = () => app.navigate(`transactions?container=${encodeURIComponent(l.container_name)}&destination=${encodeURIComponent(l.destination_host)}`);
          return h('tr.clickable', { tabindex: '0', title: 'Show the transactions of this container and host', on: { click: go, keydown: (e) => { if (e.key === 'Enter') go(); } } },
            h('td', { title: l.timestamp }, fmtTime(l.timestamp)),
            h('td', tag(l.result)),
            h('td', mono(l.container_name)),
            h('td', mono(hostPort(l.destination_host, l.destination_port)), l.resolved_hostname ? h('div.muted.small.mono', l.resolved_hostname) : null),
            h('td', mono(l.method)),
            h('td', l.reason || '', l.mitm_skip_reason ? h('div.muted.small', `mitm: ${l.mitm_skip_reason}`) : null,
              l.destination_host && l.destination_port && l.method !== 'DNS'
                ? whyDisclosure(l.container_name, l.destination_host, l.destination_port, l.resolved_hostname) : null),
            h('td.small', l.rule_summary ? mono(l.rule_summary) : (l.rule_id ? `#${l.rule_id}` : '—')),
            h('td.num', l.response_time_ms == null ? '—' : String(l.response_time_ms)));
        })))),
      h('div.pager', `${fmtNum(data.total)} entries · page ${fmtNum(page)} of ${fmtNum(pages)}`,
        h('button.btn.btn-sm', { type: 'button', disabled: page <= 1, on: { click: () => { page = 1; load(); } } }, 'Newest'),
        h('button.btn.btn-sm', { type: 'button', disabled: page <= 1, on: { click: () => { page -= 1; load(); } } }, 'Newer'),
        h('button.btn.btn-sm', { type: 'button', disabled: page >= pages, on: { click: () => { page += 1; load(); } } }, 'Older'),
        h('button.btn.btn-sm', { type: 'button', disabled: page >= pages, on: { click: () => { page = pages; load(); } } }, 'Oldest')));
  }

  const offs = [live.on('log.new', onLog), live.on('resync', load)];
  render();
  load();
  return { unmount() { offs.forEach((o) => o()); cancelAnimationFrame(frame); } };
}
