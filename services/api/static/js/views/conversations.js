// Conversations (SPEC §13): list and turns. Shown when the API has the routes; calm otherwise.
import { h, replace, mono, fmtTime, fmtNum, tag, emptyState, debounce, field, copyButton } from '../util.js';
import { get, getOptional } from '../api.js';
import * as live from '../live.js';

const LIMIT = 50;

const tokens = (u) => (u ? (u.input_tokens || 0) + (u.output_tokens || 0) : null);
function usageLine(u) {
  if (!u) return '—';
  return `${fmtNum(u.input_tokens || 0)} in · ${fmtNum(u.output_tokens || 0)} out${u.cache_read_tokens ? ` · ${fmtNum(u.cache_read_tokens)} cached` : ''}`;
}

export function notAvailable(what) {
  return h('div.empty', { dataset: { state: 'not-available' } }, h('h3', `${what} are not available in this version.`),
    h('p', 'This API does not serve that route yet. Everything else keeps working.'));
}

export function mount(root, params, query, app) {
  let selected = params.length ? params.join('/') : null;
  let page = 1;
  let data = null;
  let missing = false;
  let error = null;
  const filters = { container: '', client: '' };
  const cIn = h('input', { type: 'search' });
  cIn.addEventListener('input', debounce(() => { filters.container = cIn.value.trim(); page = 1; load(); }, 250));
  const listHost = h('div.master');
  const detailHost = h('section.detail', { 'aria-label': 'Conversation', hidden: true });
  const md = h('div.master-detail', listHost, detailHost);
  replace(root, h('div.view', h('div.view-head', h('h1', 'Conversations')), h('div.filters', field('Container', cIn)), md));

  async function load() {
    try {
      const r = await getOptional('conversations', { ...filters, limit: LIMIT, offset: (page - 1) * LIMIT });
      missing = !!r.missing;
      data = r.data || null;
      error = null;
    } catch (e) { error = e.message; }
    renderList();
  }

  function renderList() {
    if (missing) { replace(listHost, notAvailable('Conversations')); return; }
    if (error && !data) { replace(listHost, h('div.error', { role: 'alert' }, error)); return; }
    if (!data) { replace(listHost, h('p.muted', 'Loading…')); return; }
    if (!data.items.length) {
      replace(listHost, emptyState('No conversations yet.',
        'LLM calls become conversations when HTTPS is intercepted: generate the CA, make the agent trust it, and its API calls to Anthropic, OpenAI or Gemini appear here as turns.',
        'greyproxy cert generate && eval "$(greyproxy env --container claude)"'));
      return;
    }
    const pages = Math.max(1, Math.ceil(data.total / LIMIT));
    replace(listHost,
      h('div.table-wrap', h('table.grid', { 'aria-label': 'Conversations' },
        h('thead', h('tr', ['Updated', 'Client', 'Model', 'First prompt', 'Turns', 'Tokens'].map((c) => h('th', { scope: 'col', class: ['Turns', 'Tokens'].includes(c) ? 'num' : null }, c)))),
        h('tbody', data.items.map((c) => {
          const go = () => app.navigate(`conversations/${c.id.split('/').map(encodeURIComponent).join('/')}`);
          return h('tr.clickable', { tabindex: '0', 'aria-selected': String(c.id === selected), on: { click: go, keydown: (e) => { if (e.key === 'Enter') go(); } } },
            h('td', fmtTime(c.updated_at || c.ended_at)),
            h('td', mono(c.client_name || '—'), h('div.muted.small', c.container_name || '')),
            h('td', mono(c.model || '—')),
            h('td.ellipsis', { title: c.first_prompt || '' }, c.first_prompt || '—'),
            h('td.num', fmtNum(c.turn_count)),
            h('td.num', fmtNum(tokens(c.usage_with_subagents || c.usage))));
        })))),
      h('div.pager', `${fmtNum(data.total)} conversation${data.total === 1 ? '' : 's'} · page ${page} of ${pages}`,
        h('button.btn.btn-sm', { type: 'button', disabled: page <= 1, on: { click: () => { page -= 1; load(); } } }, 'Newer'),
        h('button.btn.btn-sm', { type: 'button', disabled: page >= pages, on: { click: () => { page += 1; load(); } } }, 'Older')));
  }

  function stepView(st) {
    return h('div.step-group',
      st.thinking_preview ? h('div.step.muted', h('em', 'thinking: '), st.thinking_preview) : null,
      st.text ? h('div.step', st.text) : null,
      (st.tool_calls || []).map((tc) => h('div.step.tool',
        h('strong', tc.tool || tc.name || 'tool'), ' ', tc.tool_summary || tc.input_preview || '',
        tc.linked_conversation_id ? [' → ', h('a', { href: `conversations/${tc.linked_conversation_id}`, 'data-link': '' }, 'subagent')] : null,
        tc.result_preview ? h('div', { class: ['muted', tc.is_error && 'bad'] }, tc.is_error ? 'error: ' : 'result: ', tc.result_preview) : null)));
  }

  async function loadDetail() {
    md.classList.toggle('closed', !selected);
    detailHost.hidden = !selected;
    if (!selected) return;
    replace(detailHost, h('p.muted', 'Loading…'));
    let c;
    try {
      const r = await getOptional(`conversations/${selected.split('/').map(encodeURIComponent).join('/')}`);
      if (r.missing) { replace(detailHost, h('p.muted', `Conversation ${selected} is not known (or conversations are not available in this version).`)); return; }
      c = r.data;
    } catch (e) { replace(detailHost, h('div.error', { role: 'alert' }, e.message)); return; }
    replace(detailHost,
      h('div.card-head', h('h2.mono', c.id), copyButton(c.id, 'Copy id')),
      h('div.small.muted', `${c.client_name || '—'} · ${c.model || '—'} · ${c.container_name || ''} · ${fmtNum(c.turn_count)} turn${c.turn_count === 1 ? '' : 's'} · ${usageLine(c.usage)}`),
      c.parent_conversation_id ? h('div.small', 'Subagent of ', h('a', { href: `conversations/${c.parent_conversation_id}`, 'data-link': '' }, c.parent_conversation_id)) : null,
      (c.linked_subagents || []).length ? h('div.small', 'Subagents: ', c.linked_subagents.map((s) => h('a', { href: `conversations/${s.conversation_id}`, 'data-link': '', class: 'chip' }, s.first_prompt || s.conversation_id))) : null,
      c.incomplete ? h('div.error.small', c.incomplete_reason || 'incomplete') : null,
      (c.turns || []).map((t) => h('article.turn', { 'aria-label': `Turn ${t.turn_number}` },
        h('div.card-head', h('span.muted.small', `Turn ${t.turn_number} · ${fmtTime(t.timestamp)} · ${t.duration_ms ?? '—'} ms · ${usageLine(t.usage)}`), tag(t.model || '', 'info')),
        h('div.prompt', t.user_prompt || ''),
        (t.steps || []).map(stepView))));
  }

  const offs = [live.on('conversation.updated', debounce(load, 500)), live.on('resync', () => { load(); loadDetail(); })];
  renderList();
  load();
  loadDetail();
  return {
    update(p) { selected = p.length ? p.join('/') : null; loadDetail(); renderList(); },
    unmount() { offs.forEach((o) => o()); },
  };
}
