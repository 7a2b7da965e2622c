// Settings: theme (applied at once), notifications, MITM, conversations, redacted headers,
// the CA, sessions and global credentials, endpoint rules and dissectors.
import { h, replace, mono, fmtTime, fmtAgo, fmtNum, tag, toast, field, copyButton } from '../util.js';
import { get, put, post, del, getOptional, facts, ApiError, apiUrl } from '../api.js';
import * as live from '../live.js';
import { applyTheme } from '../main.js';
import { notAvailable } from './conversations.js';

const DEFAULT_HEADERS = new Set((facts.defaultRedactedHeaders || []).map((x) => x.toLowerCase()));

export function mount(root, params, query, app) {
  const cards = {
    general: h('section.card', { 'aria-labelledby': 'h-general' }),
    redaction: h('section.card', { 'aria-labelledby': 'h-redaction' }),
    cert: h('section.card', { 'aria-labelledby': 'h-cert' }),
    sessions: h('section.card', { 'aria-labelledby': 'h-sessions' }),
    credentials: h('section.card', { 'aria-labelledby': 'h-creds' }),
    endpoints: h('section.card', { 'aria-labelledby': 'h-endpoints' }),
  };
  replace(root, h('div.view', h('div.view-head', h('h1', 'Settings')), h('div.settings-grid', Object.values(cards))));
  let settings = null;

  async function save(patch) {
    try {
      settings = await put('settings', patch);
      app.settings = settings;
      if (patch.theme) applyTheme(settings.theme);
      renderGeneral();
      renderRedaction();
      return true;
    } catch (e) { toast(e.message, 'error'); return e; }
  }

  function toggle(key, label, hint) {
    const box = h('input', { type: 'checkbox', checked: !!settings[key], on: { change: (e) => save({ [key]: e.target.checked }) } });
    return h('label.check', box, h('span', label, hint ? h('div.muted.small', hint) : null));
  }

  function renderGeneral() {
    const c = cards.general;
    if (!settings) { replace(c, h('h2#h-general', 'General'), h('p.muted', 'Loading…')); return; }
    const n = settings.notifications || {};
    replace(c, h('h2#h-general', 'General'),
      h('fieldset', h('legend', 'Theme'),
        h('div.radios', { role: 'radiogroup', 'aria-label': 'Theme' }, ['system', 'light', 'dark'].map((t) => h('label', { class: ['radio', settings.theme === t && 'on'] },
          h('input', { type: 'radio', name: 'theme', value: t, checked: settings.theme === t, on: { change: () => { applyTheme(t); save({ theme: t }); } } }), t)))),
      toggle('notificationsEnabled', 'OS notifications for new pending entries',
        n.available ? `via ${n.backend}; a click opens the entry here` : 'no notifier found on this machine (notify-send / terminal-notifier)'),
      toggle('mitmEnabled', 'Intercept HTTPS (MITM)', 'records transactions when the CA exists and the client trusts it'),
      toggle('conversationsEnabled', 'Track LLM conversations'),
      toggle('logDnsQueries', 'Log DNS queries', 'off by default: they are many'));
  }

  function renderRedaction() {
    const c = cards.redaction;
    if (!settings) { replace(c, h('h2#h-redaction', 'Redacted headers')); return; }
    const all = settings.redactedHeaders || [];
    const extras = all.filter((x) => !DEFAULT_HEADERS.has(x.toLowerCase()));
    const ta = h('textarea', { rows: 3, spellcheck: 'false', value: extras.join('\n'), placeholder: 'X-My-Header\n*-signature' });
    const f = field('Extra header names (one a line, * wildcards)', ta, { name: 'redactedHeaders', hint: 'Their values are stored and shown as [REDACTED]. The built-in names always apply.' });
    replace(c, h('h2#h-redaction', 'Redacted headers'),
      h('div.chips', { 'aria-label': 'Always redacted' }, [...DEFAULT_HEADERS].map((x) => h('span.chip', x))),
      f,
      h('div.form-row',
        h('button.btn.btn-sm.btn-primary', { type: 'button', on: { click: async () => {
          f.showError(null);
          const r = await save({ redactedHeaders: ta.value.split('\n').map((x) => x.trim()).filter(Boolean) });
          if (r === true) toast('Redacted headers saved'); else f.showError(r.message);
        } } }, 'Save'),
        h('button.btn.btn-sm', { type: 'button', title: 'Re-apply the current redaction to every stored transaction', on: { click: async () => {
          try { const r = await post('maintenance/redact-headers'); toast(`Job ${r.job} ${r.status}`); } catch (e) { toast(e.message, 'error'); }
        } } }, 'Re-apply to stored transactions')));
  }

  async function renderCert() {
    const c = cards.cert;
    let st;
    try { st = await get('cert/status'); } catch (e) { replace(c, h('h2#h-cert', 'Certificate authority'), h('div.error', e.message)); return; }
    let force = false;
    const gen = async () => {
      try {
        await post(`cert/generate${force ? '?force=true' : ''}`);
        toast('CA generated');
        renderCert();
      } catch (e) {
        if (e instanceof ApiError && e.status === 409) { force = true; genBtn.textContent = 'Replace the CA (clients must trust the new one)'; genBtn.classList.add('btn-deny'); toast(e.message, 'error'); }
        else toast(e.message, 'error');
      }
    };
    const genBtn = h('button.btn.btn-sm', { type: 'button', on: { click: gen } }, st.generated ? 'Generate a new CA…' : 'Generate the CA');
    const cmds = Object.entries(st.installCommands || {});
    replace(c, h('h2#h-cert', 'Certificate authority'),
      st.generated
        ? h('dl.facts',
          h('dt', 'status'), h('dd', tag('generated', 'info'), ' ', st.installed ? tag('installed', 'allow') : tag('not installed', 'pending')),
          h('dt', 'subject'), h('dd.mono', st.subject || ''),
          h('dt', 'expires'), h('dd', st.expiresAt ? fmtTime(st.expiresAt) : '—'),
          h('dt', 'SHA-256'), h('dd.mono.small', st.fingerprintSha256 || ''),
          h('dt', 'file'), h('dd.mono.small', st.certPath || ''))
        : h('p.muted', 'No CA yet: HTTPS passes through untouched and is not recorded.'),
      h('div.form-row',
        st.generated ? h('a.btn.btn-sm', { href: apiUrl('cert/download').pathname, download: 'greyproxy-ca.pem' }, 'Download CA') : null,
        genBtn),
      cmds.length ? h('div', h('h3', 'Trust it on this machine'), cmds.map(([os, cmd]) => h('div', h('div.muted.small', os),
        h('div.cmdline', h('code.mono', cmd), copyButton(cmd, `Copy the ${os} command`, 'Command copied'))))) : null);
  }

  async function renderSessions() {
    const c = cards.sessions;
    let r;
    try { r = await getOptional('sessions'); } catch (e) { replace(c, h('h2#h-sessions', 'Sessions'), h('div.error', e.message)); return; }
    if (r.missing) { replace(c, h('h2#h-sessions', 'Sessions'), notAvailable('Sessions')); return; }
    const list = Array.isArray(r.data) ? r.data : (r.data.items || []);
    replace(c, h('h2#h-sessions', 'Sessions'),
      list.length ? h('ul.list', list.map((s) => h('li',
        h('span.grow', h('span.mono.strong', s.session_id), ' ', h('span.muted.small', s.container_name),
          h('div.chips', (s.credential_labels || []).map((l) => h('span.chip', l)))),
        h('span.muted.small', `${fmtNum(s.substitution_count)} uses · expires ${fmtAgo(s.expires_at)}`))))
        : h('p.muted', 'No live sessions. A sandbox wrapper registers one with POST /api/sessions.'));
  }

  async function renderCredentials() {
    const c = cards.credentials;
    let r;
    try { r = await getOptional('credentials'); } catch (e) { replace(c, h('h2#h-creds', 'Global credentials'), h('div.error', e.message)); return; }
    if (r.missing) { replace(c, h('h2#h-creds', 'Global credentials'), notAvailable('Global credentials')); return; }
    const list = Array.isArray(r.data) ? r.data : (r.data.items || []);
    const label = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', placeholder: 'ANTHROPIC_API_KEY' });
    const value = h('input', { type: 'password', autocomplete: 'new-password' });
    const hosts = h('input', { type: 'text', autocomplete: 'off', placeholder: 'api.anthropic.com (comma separated)' });
    const fields = { label: field('Label', label, { name: 'label' }), value: field('Value', value, { name: 'value', hint: 'never shown again' }), hosts: field('Hosts', hosts, { name: 'hosts', wide: true }) };
    const add = async (ev) => {
      ev.preventDefault();
      Object.values(fields).forEach((f) => f.showError(null));
      try {
        await post('credentials', { label: label.value.trim(), value: value.value, hosts: hosts.value.split(',').map((x) => x.trim()).filter(Boolean) });
        value.value = '';
        toast('Credential added');
        renderCredentials();
      } catch (e) {
        const m = e.message || '';
        const f = /label/i.test(m) ? 'label' : /host|pattern/i.test(m) ? 'hosts' : 'value';
        fields[f].showError(m);
      }
    };
    replace(c, h('h2#h-creds', 'Global credentials'),
      list.length ? h('ul.list', list.map((cr) => h('li',
        h('span.grow', h('span.mono.strong', cr.label), ' ', h('span.mono.small.muted', cr.value_preview || ''),
          h('div.chips', (cr.hosts || []).map((x) => h('span.chip', x)))),
        h('span.muted.small', `${fmtNum(cr.substitution_count)} uses`),
        copyButton(cr.placeholder, `Copy the placeholder of ${cr.label}`, 'Placeholder copied'),
        // Two clicks, as a rule's delete: the first asks (in place: the add form keeps what is
        // typed in it), the second deletes.
        h('button.btn.btn-xs', { type: 'button', 'aria-label': `Delete ${cr.label}`, on: { click: async (ev) => {
          const btn = ev.currentTarget;
          if (!btn.classList.contains('btn-deny')) {
            btn.classList.add('btn-deny');
            btn.textContent = 'Confirm delete';
            btn.setAttribute('aria-label', `Confirm delete ${cr.label}`);
            return;
          }
          btn.disabled = true;
          try { await del(`credentials/${cr.id}`); toast(`Credential ${cr.label} deleted`); renderCredentials(); } catch (e) { btn.disabled = false; toast(e.message, 'error'); }
        } } }, 'Delete')))) : h('p.muted', 'No global credentials.'),
      h('form', { on: { submit: add }, 'aria-label': 'Add a global credential' }, h('div.form-row', fields.label, fields.value, fields.hosts),
        h('button.btn.btn-sm.btn-primary', { type: 'submit' }, 'Add credential')));
  }

  async function renderEndpoints() {
    const c = cards.endpoints;
    let r, d;
    try { [r, d] = await Promise.all([getOptional('endpoint-rules'), getOptional('dissectors')]); } catch (e) { replace(c, h('h2#h-endpoints', 'LLM endpoint rules'), h('div.error', e.message)); return; }
    if (r.missing) { replace(c, h('h2#h-endpoints', 'LLM endpoint rules'), notAvailable('Endpoint rules')); return; }
    const rules = r.data.rules || [];
    replace(c, h('h2#h-endpoints', 'LLM endpoint rules'),
      h('div.table-wrap', h('table.grid', { 'aria-label': 'Endpoint rules' },
        h('thead', h('tr', ['Host', 'Path', 'Method', 'Dissector', ''].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', rules.map((er) => h('tr', h('td', mono(er.host_pattern)), h('td', mono(er.path_pattern)), h('td', mono(er.method)),
          h('td', mono(er.decoder_name)), h('td', er.user_defined ? tag('user', 'info') : tag('built-in', 'builtin'), er.enabled ? null : [' ', tag('disabled', 'expired')])))))),
      d.data ? h('div', h('h3', 'Dissectors'), h('ul.list', (d.data.dissectors || []).map((x) => h('li', h('span.mono.strong', x.name), h('span.grow.muted.small', x.description))))) : null);
  }

  async function load() {
    try { settings = await get('settings'); } catch (e) { replace(cards.general, h('div.error', e.message)); }
    renderGeneral();
    renderRedaction();
    renderCert();
    renderSessions();
    renderCredentials();
    renderEndpoints();
  }

  const offs = [
    live.on('settings.changed', (st) => { settings = st; renderGeneral(); renderRedaction(); }),
    live.on('resync', load),
  ];
  for (const t of ['session.created', 'session.deleted', 'session.expired']) offs.push(live.on(t, () => renderSessions()));
  renderGeneral();
  load();
  return { unmount() { offs.forEach((o) => o()); } };
}
