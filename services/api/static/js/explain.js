// "Why?": the proxy's own explanation of a decision (GET /api/rules/explain, SPEC §16), fetched
// when the disclosure is opened.
import { h, replace, mono, hostPort } from './util.js';
import { get } from './api.js';

function ruleLine(r) {
  return r ? `#${r.id} ${r.action} ${r.container_pattern} → ${hostPort(r.destination_pattern, r.port_pattern)}` : '—';
}

function render(body) {
  return h('div.explain',
    h('p', h('strong', body.decision), body.rule ? [' by ', mono(ruleLine(body.rule)), ` (${body.layer} layer)`] : null),
    h('p.small', body.reason),
    body.candidates.length
      ? h('ul.small.explain-candidates', body.candidates.map((c) => h('li', { class: [c.winner && 'winner', !c.matched && 'muted'] },
        c.winner ? '★ ' : c.matched ? '✓ ' : '✗ ', mono(ruleLine(c.rule)), ` · specificity ${c.specificity} · ${c.why}`)))
      : h('p.small.muted', 'No rule names this destination.'));
}

// A <details> that explains container → host:port when opened (again on each opening: rules change).
export function whyDisclosure(container, host, port, resolved) {
  const out = h('div.explain-body', { 'aria-live': 'polite' });
  const details = h('details.why', { on: { click: (ev) => ev.stopPropagation(), keydown: (ev) => ev.stopPropagation() } },
    h('summary', 'Why?'), out);
  details.addEventListener('toggle', async () => {
    if (!details.open) return;
    replace(out, h('p.muted.small', 'Asking the proxy…'));
    try {
      const params = { container, host, port };
      if (resolved) params.resolved = resolved;
      replace(out, render(await get('rules/explain', params)));
    } catch (e) {
      replace(out, h('p.error.small', { role: 'alert' }, `Could not explain: ${e.message}`));
    }
  });
  return details;
}
