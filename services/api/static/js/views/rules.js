// Rules: filter, create, edit, delete; the API's 400 message is shown at the field it names.
import { h, replace, mono, hostPort, fmtTime, fmtAgo, tag, toast, field, select, emptyState, debounce, fmtNum } from '../util.js';
import { get, post, put, del, ApiError } from '../api.js';
import * as live from '../live.js';

const LIMIT = 100;
const FIELDS = ['container_pattern', 'destination_pattern', 'port_pattern', 'action', 'expires_at', 'notes'];

// Which form field an API message is about: the field it names, else the form as a whole.
export function fieldOf(message) {
  const m = String(message || '');
  for (const f of FIELDS) if (m.includes(f)) return f;
  if (/expires_in_seconds|expir/i.test(m)) return 'expires_at';
  if (/port/i.test(m)) return 'port_pattern';
  if (/container/i.test(m)) return 'container_pattern';
  if (/destination|host|cidr|pattern/i.test(m)) return 'destination_pattern';
  if (/action/i.test(m)) return 'action';
  return null;
}

export function mount(root, params, query, app) {
  const filters = { container: query.get('container') || '', destination: query.get('destination') || '', action: query.get('action') || '', include_expired: false };
  let page = 0;
  let data = null;
  let error = null;
  let editing = null; // null | 'new' | rule
  let confirmDelete = null;
  const prefill = query.get('new') ? { container_pattern: query.get('container') || '*', destination_pattern: query.get('destination') || '', port_pattern: query.get('port') || '*', action: query.get('action') || 'allow' } : null;
  if (prefill) { editing = 'new'; filters.container = ''; filters.destination = ''; filters.action = ''; }

  const cIn = h('input', { type: 'search', value: filters.container, placeholder: 'container' });
  const dIn = h('input', { type: 'search', value: filters.destination, placeholder: 'host or pattern' });
  const aSel = select([['', 'any'], ['allow', 'allow'], ['deny', 'deny']], filters.action);
  const xIn = h('input', { type: 'checkbox', id: 'rules-expired' });
  const onFilter = debounce(() => {
    Object.assign(filters, { container: cIn.value.trim(), destination: dIn.value.trim(), action: aSel.value, include_expired: xIn.checked });
    page = 0; load();
  }, 200);
  for (const el of [cIn, dIn]) el.addEventListener('input', onFilter);
  for (const el of [aSel, xIn]) el.addEventListener('change', onFilter);

  const formHost = h('div');
  const listHost = h('div.master');
  replace(root, h('div.view',
    h('div.view-head', h('h1', 'Rules'),
      h('div.tools', h('button.btn.btn-primary', { type: 'button', on: { click: () => { editing = 'new'; renderForm(); } } }, 'New rule'))),
    h('div.filters',
      field('Container', cIn), field('Destination', dIn), field('Action', aSel),
      h('label.check', xIn, 'include expired')),
    formHost, listHost));

  async function load() {
    try {
      data = await get('rules', { ...filters, include_expired: filters.include_expired ? 'true' : '', limit: LIMIT, offset: page * LIMIT });
      error = null;
    } catch (e) { error = e.message; }
    renderList();
  }

  function renderForm() {
    if (!editing) { replace(formHost); return; }
    const r = editing === 'new' ? (prefill || { container_pattern: '*', destination_pattern: '', port_pattern: '*', action: 'allow', notes: '' }) : editing;
    const inputs = {
      container_pattern: h('input', { type: 'text', value: r.container_pattern || '', autocomplete: 'off', spellcheck: 'false' }),
      destination_pattern: h('input', { type: 'text', value: r.destination_pattern || '', autocomplete: 'off', spellcheck: 'false', placeholder: 'api.example.com, *.example.com, **.example.com, 10.0.0.0/8' }),
      port_pattern: h('input', { type: 'text', value: r.port_pattern || '*', autocomplete: 'off', placeholder: '443, 80,443, 8000-8999, *' }),
      action: select([['allow', 'allow'], ['deny', 'deny']], r.action || 'allow'),
      expires_at: h('input', { type: 'text', value: r.expires_at || '', placeholder: 'never (or 2026-12-31T00:00:00Z)', autocomplete: 'off' }),
      notes: h('input', { type: 'text', value: r.notes || '' }),
    };
    const fields = {
      container_pattern: field('Container pattern', inputs.container_pattern, { name: 'container_pattern', hint: '* = any container' }),
      destination_pattern: field('Destination pattern', inputs.destination_pattern, { name: 'destination_pattern', wide: true }),
      port_pattern: field('Port', inputs.port_pattern, { name: 'port_pattern' }),
      action: field('Action', inputs.action, { name: 'action' }),
      expires_at: field('Expires', inputs.expires_at, { name: 'expires_at', hint: 'RFC 3339; empty = never' }),
      notes: field('Notes', inputs.notes, { name: 'notes', wide: true }),
    };
    const formErr = h('div.error', { role: 'alert', hidden: true });
    const save = async (ev) => {
      ev.preventDefault();
      for (const f of Object.values(fields)) f.showError(null);
      formErr.hidden = true;
      const body = {
        container_pattern: inputs.container_pattern.value, destination_pattern: inputs.destination_pattern.value,
        port_pattern: inputs.port_pattern.value, action: inputs.action.value, notes: inputs.notes.value || null,
      };
      const exp = inputs.expires_at.value.trim();
      try {
        let saved;
        if (editing === 'new') {
          if (exp) body.expires_at = exp;
          saved = await post('rules', { ...body, created_by: 'dashboard' });
        } else {
          body.expires_at = exp || null;
          saved = await put(`rules/${editing.id}`, body);
        }
        toast(`Rule #${saved.id} saved`);
        editing = null;
        renderForm();
        load();
      } catch (e) {
        const f = e instanceof ApiError && e.status === 400 ? fieldOf(e.message) : null;
        if (f && fields[f]) { fields[f].showError(e.message); inputs[f].focus(); } else { formErr.textContent = e.message; formErr.hidden = false; }
      }
    };
    replace(formHost, h('form.rule-edit', { 'aria-label': editing === 'new' ? 'New rule' : `Edit rule ${editing.id}`, novalidate: true, on: { submit: save } },
      h('h2', editing === 'new' ? 'New rule' : `Edit rule #${editing.id}`),
      h('div.form-row', fields.container_pattern, fields.destination_pattern, fields.port_pattern, fields.action),
      h('div.form-row', fields.expires_at, fields.notes),
      formErr,
      h('div.form-row',
        h('button.btn.btn-primary', { type: 'submit' }, editing === 'new' ? 'Create rule' : 'Save'),
        h('button.btn', { type: 'button', on: { click: () => { editing = null; renderForm(); } } }, 'Cancel'))));
    (editing === 'new' && !prefill ? inputs.destination_pattern : inputs.container_pattern).focus();
  }

  async function remove(r) {
    if (confirmDelete !== r.id) { confirmDelete = r.id; renderList(); return; }
    confirmDelete = null;
    try {
      const out = await del(`rules/${r.id}`);
      toast(out.deleted ? `Rule #${r.id} deleted` : `Rule #${r.id} was already gone`);
      load();
    } catch (e) { toast(e.message, 'error'); }
  }

  function renderList() {
    if (error && !data) { replace(listHost, h('div.error', { role: 'alert' }, error)); return; }
    if (!data) { replace(listHost, h('p.muted', 'Loading…')); return; }
    if (!data.items.length) {
      replace(listHost, emptyState('No rules match.', 'Create one with “New rule”, or decide a pending entry: each decision makes a rule.'));
      return;
    }
    const pages = Math.max(1, Math.ceil(data.total / LIMIT));
    replace(listHost,
      h('div.table-wrap', h('table.grid', { 'aria-label': 'Rules' },
        h('thead', h('tr', ['', 'Container', 'Destination', 'Port', 'Source', 'Hits', 'Last used', 'Expires', 'Notes', ''].map((t) => h('th', { scope: 'col', class: t === 'Hits' ? 'num' : null }, t)))),
        h('tbody', data.items.map((r) => h('tr', { dataset: { id: r.id } },
          h('td', tag(r.action)),
          h('td', mono(r.container_pattern)),
          h('td', mono(r.destination_pattern)),
          h('td', mono(r.port_pattern)),
          h('td', tag(r.source, r.source), r.is_active ? null : [' ', tag('expired')]),
          h('td.num', fmtNum(r.hit_count)),
          h('td', r.last_used_at ? fmtAgo(r.last_used_at) : '—'),
          h('td.nowrap', r.expires_at ? fmtTime(r.expires_at) : 'never'),
          h('td.ellipsis', { title: r.notes || '' }, r.notes || ''),
          // Builtin rules are not edited or deleted here: greyproxy.builtinRules switches them off.
          h('td', r.source === 'builtin'
            ? h('span.muted.small', { title: 'Builtin rules cannot be edited; set greyproxy.builtinRules: false in the config to switch them off' }, 'builtin')
            : h('div.btns',
              h('button.btn.btn-xs', { type: 'button', 'aria-label': `Edit rule ${r.id}`, on: { click: () => { editing = r; renderForm(); } } }, 'Edit'),
              h('button', { class: ['btn', 'btn-xs', confirmDelete === r.id && 'btn-deny'], type: 'button', 'aria-label': confirmDelete === r.id ? `Confirm delete rule ${r.id}` : `Delete rule ${r.id}`, on: { click: () => remove(r) } },
                confirmDelete === r.id ? 'Confirm delete' : 'Delete')))))))),
      h('div.pager', `${fmtNum(data.total)} rule${data.total === 1 ? '' : 's'} · page ${page + 1} of ${pages}`,
        h('button.btn.btn-sm', { type: 'button', disabled: page === 0, on: { click: () => { page -= 1; load(); } } }, 'Previous'),
        h('button.btn.btn-sm', { type: 'button', disabled: page + 1 >= pages, on: { click: () => { page += 1; load(); } } }, 'Next')));
  }

  const reload = debounce(load, 200);
  const offs = ['rule.created', 'rule.updated', 'rule.deleted', 'resync'].map((t) => live.on(t, reload));
  renderForm();
  renderList();
  load();
  return { unmount() { offs.forEach((o) => o()); } };
}
