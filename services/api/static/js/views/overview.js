// Overview: process health, counters, the traffic timeline (inline SVG), top blocked, recent decisions.
import { h, s, replace, mono, hostPort, fmtTime, fmtNum, fmtAgo, tag, toast, select } from '../util.js';
import { get, post } from '../api.js';
import * as live from '../live.js';

const PROCESSES = ['bus', 'proxy', 'api', 'recorder', 'maintenance'];
// /api/health's states (docs/events.md, service.heartbeat): "unreachable" is a proxy on another
// host whose heartbeats arrive but which does not answer the API.
const STATE_TEXT = { up: '● up', starting: '◌ starting', unreachable: '✕ unreachable', down: '✕ down' };
const PERIODS = [['today', 'Today'], ['7d', '7 days'], ['30d', '30 days']];

export function mount(root, params, query, app) {
  let period = query.get('period') || 'today';
  let data = null;
  let error = null;

  const periodSel = select(PERIODS, period, { 'aria-label': 'Period', on: { change: (e) => { period = e.target.value; load(); } } });
  const body = h('div.overview-body');
  // The health card is redrawn on its own (every /api/health read, every few seconds) and the
  // silent mode duration kept, so neither a health read nor a log row resets what is being used.
  const healthHost = h('section.card', { 'aria-labelledby': 'h-health' });
  const mins = h('select', { 'aria-label': 'Silent mode duration' }, [[300, '5 min'], [900, '15 min'], [3600, '1 hour'], [0, 'until restart']].map(([v, t]) => h('option', { value: v }, t)));
  replace(root, h('div.view', h('div.view-head', h('h1', 'Overview'), h('div.tools', periodSel)), body));

  async function load() {
    try { data = await get('dashboard', { period, recent_limit: 12 }); error = null; } catch (e) { error = e.message; }
    render();
  }

  function stat(label, value, cls, sub) {
    return h('div', { class: ['card', 'stat', cls && `stat-${cls}`] }, h('div.label', label), h('div.value', value), sub ? h('div.muted.small', sub) : null);
  }

  function healthCard() {
    const services = (app.health && app.health.services) || {};
    const focused = healthHost.contains(document.activeElement);
    replace(healthHost,
      h('div.card-head', h('h2#h-health', 'Processes'),
        h('button.btn.btn-ghost.btn-xs', { type: 'button', on: { click: async () => { const { refreshHealth } = await import('../main.js'); await refreshHealth(); healthCard(); } } }, 'Refresh')),
      h('div.procs', PROCESSES.flatMap((p) => {
        const cells = [procCell(p, services[p], false)];
        // After "proxy": each proxy process on its own (workers proxy-0 …, proxies on other hosts).
        if (p === 'proxy') {
          const more = Object.keys(services).filter((n) => !PROCESSES.includes(n)).sort();
          for (const n of more) cells.push(procCell(n, services[n], true));
        }
        return cells;
      })));
    if (focused) healthHost.querySelector('button')?.focus();
    return healthHost;
  }

  function procCell(name, svc, worker) {
    const up = svc ? svc.up : null;
    const state = svc ? (svc.state || (up ? 'up' : 'down')) : null;
    const cls = up == null ? '' : up ? 'up' : state === 'starting' ? 'starting' : 'down';
    return h('div', { class: ['proc', worker && 'worker'], 'data-proc': name },
      h('span.mono.strong', name),
      h('span', { class: ['state', cls] }, state == null ? '— unknown' : STATE_TEXT[state] || `✕ ${state}`),
      // Up: its heartbeats are current (a stale one comes as health.changed within a second or two);
      // otherwise the age of its last heartbeat, which ticks.
      h('span.muted.small', svc && svc.pid ? `pid ${svc.pid}` : '',
        svc && up ? ' · heartbeat current'
          : svc && svc.last_seen ? h('span', { dataset: { ago: svc.last_seen, prefix: ' · last seen ' } }, ` · last seen ${fmtAgo(svc.last_seen)}`) : ''),
      // It died (killed, crashed, or stalled: bus.stallTimeout) and was started again: its log says why.
      svc && svc.restarts > 0 && h('span', {
        class: 'restarts small',
        title: `started again after it ended without a clean stop; last ${svc.last_restart || ''} — see logs/${name}.log`,
      }, `↻ restarted ${svc.restarts}×`, svc.last_restart ? h('span', { dataset: { ago: svc.last_restart, prefix: ' · ' } }, ` · ${fmtAgo(svc.last_restart)}`) : ''));
  }

  function chart(timeline) {
    const W = 1000, H = 180, L = 36, B = 22, T = 8;
    if (!timeline || !timeline.length) return h('p.muted', 'No traffic in this period yet.');
    const max = Math.max(1, ...timeline.map((p) => (p.allowed || 0) + (p.blocked || 0)));
    const bw = (W - L) / timeline.length;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `Traffic timeline: ${timeline.length} buckets, at most ${max} requests in one` });
    svg.append(s('line', { x1: L, x2: W, y1: H - B, y2: H - B, class: 'axis' }));
    svg.append(s('text', { x: L - 6, y: T + 8, 'text-anchor': 'end' }, fmtNum(max)));
    svg.append(s('text', { x: L - 6, y: H - B, 'text-anchor': 'end' }, '0'));
    timeline.forEach((p, i) => {
      const x = L + i * bw + Math.min(2, bw * 0.15);
      const w = Math.max(1, bw - Math.min(4, bw * 0.3));
      const a = p.allowed || 0, b = p.blocked || 0;
      const title = `${fmtTime(p.timestamp)}: ${a} allowed, ${b} blocked`;
      if (a) svg.append(s('rect', { x, y: y(a), width: w, height: H - B - y(a), class: 'bar-allowed' }, s('title', {}, title)));
      if (b) svg.append(s('rect', { x, y: y(a + b), width: w, height: y(a) - y(a + b), class: 'bar-blocked' }, s('title', {}, title)));
      const every = Math.ceil(timeline.length / 8);
      if (i % every === 0) {
        const d = new Date(p.timestamp);
        const label = period === 'today' ? `${String(d.getHours()).padStart(2, '0')}:00` : `${d.getMonth() + 1}/${d.getDate()}`;
        svg.append(s('text', { x: L + i * bw + bw / 2, y: H - 6, 'text-anchor': 'middle' }, label));
      }
    });
    return h('div.chart', svg);
  }

  async function ruleFor(d, action) {
    try {
      const r = await post('rules', { container_pattern: '*', destination_pattern: d.host, port_pattern: String(d.port), action, created_by: 'dashboard' });
      toast(`Rule #${r.id}: ${action} * → ${hostPort(d.host, d.port)}`);
    } catch (e) { toast(e.message, 'error'); }
  }

  function silentControl() {
    const st = app.allowall;
    const go = async (mode) => {
      try {
        const { setAllowall } = await import('../main.js');
        setAllowall(await post('allowall', { mode, duration_seconds: Number(mins.value) }));
      } catch (e) { toast(e.message, 'error'); }
    };
    return h('section.card', { 'aria-labelledby': 'h-silent' },
      h('div.card-head', h('h2#h-silent', 'Silent mode'), st && st.active ? tag(st.mode === 'deny' ? 'deny all' : 'allow all', 'info') : h('span.muted.small', 'off')),
      h('p.muted.small', 'Bypass rules and the pending queue for a while. Every connection is still logged.'),
      h('div.form-row', mins,
        h('button.btn.btn-sm', { type: 'button', on: { click: () => go('allow') } }, 'Allow all'),
        h('button.btn.btn-sm', { type: 'button', on: { click: () => go('deny') } }, 'Deny all')));
  }

  function render() {
    if (error && !data) { replace(body, h('div.error', { role: 'alert' }, `Could not read /api/dashboard: ${error}`), healthCard()); return; }
    if (!data) { replace(body, h('p.muted', 'Loading…')); return; }
    const recent = data.recent || [];
    const top = data.top_blocked || data.top_destinations || [];
    replace(body,
      h('div.cards',
        stat('Allowed', fmtNum(data.allowed), 'allow', data.allow_rate != null ? `${Math.round(data.allow_rate)}% of ${fmtNum(data.total_requests)}` : null),
        stat('Blocked', fmtNum(data.blocked), 'deny'),
        h('a', { href: 'pending', 'data-link': '', class: 'cardlink' }, stat('Pending', fmtNum(app.pendingCount ?? data.pending_count), 'wait', data.waiting ? `${data.waiting} connection(s) held now` : 'none held')),
        stat('Active connections', fmtNum(data.active_connections), null, 'live, from the proxy')),
      healthCard(),
      h('section.card', { 'aria-labelledby': 'h-tl' },
        h('div.card-head', h('h2#h-tl', 'Traffic'), h('div.legend', h('span', h('span.sw.allowed'), 'allowed'), h('span', h('span.sw.blocked'), 'blocked'))),
        chart(data.timeline)),
      h('div.two',
        h('section.card', { 'aria-labelledby': 'h-top' }, h('h2#h-top', 'Top blocked'),
          top.length ? h('ul.list', top.map((d) => h('li',
            h('span.grow.mono', { title: hostPort(d.host, d.port) }, hostPort(d.host, d.port)),
            h('span.muted.small', `${fmtNum(d.count)}×`),
            h('button.btn.btn-xs', { type: 'button', title: `Create a rule allowing every container to ${hostPort(d.host, d.port)}`, on: { click: () => ruleFor(d, 'allow') } }, 'Allow rule'))))
            : h('p.muted', 'Nothing blocked in this period.')),
        h('section.card', { 'aria-labelledby': 'h-recent' }, h('h2#h-recent', 'Recent decisions'),
          recent.length ? h('ul.list.recent', recent.map((l) => h('li',
            tag(l.result), h('span.mono.small.clip', { title: l.container_name }, l.container_name),
            h('span.grow.keep.mono', { title: hostPort(l.destination_host, l.destination_port) }, hostPort(l.destination_host, l.destination_port)),
            h('span.muted.small.nowrap.push', l.reason || ''), h('span.muted.small.nowrap', fmtTime(l.timestamp)))))
            : h('p.muted', 'No decisions yet.'))),
      silentControl());
  }

  // Live: counters and the recent list move with log.new; nothing is polled.
  const offs = [
    live.on('log.new', (l) => {
      if (!data) return;
      data.total_requests = (data.total_requests || 0) + 1;
      if (l.result === 'allowed') data.allowed = (data.allowed || 0) + 1; else data.blocked = (data.blocked || 0) + 1;
      data.allow_rate = data.total_requests ? (100 * data.allowed) / data.total_requests : 0;
      data.recent = [l, ...(data.recent || [])].slice(0, 12);
      const tl = data.timeline || [];
      const last = tl[tl.length - 1];
      if (last) { if (l.result === 'allowed') last.allowed += 1; else last.blocked += 1; }
      scheduleRender();
    }),
    live.on('resync', load),
  ];
  const onDoc = () => scheduleRender();
  const onHealth = () => healthCard();
  for (const ev of ['gp:pending-count', 'gp:allowall']) document.addEventListener(ev, onDoc);
  document.addEventListener('gp:health', onHealth);
  // "last seen N s ago" and a restart's age tick on the page (no reads: health comes as events).
  const ageTick = setInterval(() => {
    for (const el of healthHost.querySelectorAll('[data-ago]')) el.textContent = `${el.dataset.prefix}${fmtAgo(el.dataset.ago)}`;
  }, 1000);
  let frame = 0;
  function scheduleRender() { if (!frame) frame = setTimeout(() => { frame = 0; render(); }, 250); }

  render();
  load();
  return {
    unmount() {
      offs.forEach((o) => o());
      for (const ev of ['gp:pending-count', 'gp:allowall']) document.removeEventListener(ev, onDoc);
      document.removeEventListener('gp:health', onHealth);
      clearTimeout(frame);
      clearInterval(ageTick);
    },
  };
}
