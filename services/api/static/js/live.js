// The one /ws connection: events to subscribers, reconnect with backoff, a state for the banner.

const listeners = new Map(); // type -> Set(fn); '*' gets everything
const stateListeners = new Set();
let ws = null;
let state = 'connecting'; // connecting | connected | reconnecting
let attempt = 0;
let retryAt = 0;
let retryTimer = null;
let everConnected = false;

export function on(type, fn) {
  if (!listeners.has(type)) listeners.set(type, new Set());
  listeners.get(type).add(fn);
  return () => listeners.get(type).delete(fn);
}

export function onState(fn) { stateListeners.add(fn); fn(state, { retryAt }); return () => stateListeners.delete(fn); }

export const getState = () => state;

function setState(next, info = {}) {
  state = next;
  for (const fn of stateListeners) fn(state, { retryAt, ...info });
}

function emit(type, data, msg) {
  for (const key of [type, '*']) {
    const set = listeners.get(key);
    if (set) for (const fn of [...set]) { try { fn(data, msg); } catch (e) { console.warn('listener failed', e); } }
  }
}

function socketUrl() {
  const u = new URL('ws', document.baseURI);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  return u.toString();
}

const pendingReplies = [];

export function connect() {
  clearTimeout(retryTimer);
  let sock;
  try { sock = new WebSocket(socketUrl()); } catch { scheduleRetry(); return; }
  ws = sock;
  sock.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    if (msg.type === 'connected') {
      const wasDown = everConnected || attempt > 0; // (a page opened while the API was down re-reads too)
      everConnected = true;
      attempt = 0;
      setState('connected');
      if (wasDown) emit('resync', null, msg); // every view re-reads what it shows
      return;
    }
    if (msg.type === 'command_success' || msg.type === 'error' || msg.type === 'pong') {
      const waiter = pendingReplies.shift();
      if (waiter) waiter(msg);
      return;
    }
    if (msg.type === 'dropped') { emit('resync', null, msg); return; }
    emit(msg.type, msg.data, msg);
  };
  sock.onclose = () => {
    if (ws !== sock) return;
    ws = null;
    while (pendingReplies.length) pendingReplies.shift()({ type: 'error', error: 'disconnected' });
    scheduleRetry();
  };
  sock.onerror = () => { /* onclose follows and schedules the retry */ };
}

function scheduleRetry() {
  attempt += 1;
  const delay = Math.min(10000, 500 * 2 ** Math.min(attempt - 1, 5)) * (0.8 + Math.random() * 0.4);
  retryAt = Date.now() + delay;
  setState('reconnecting'); // the banner from the first failed attempt, even if none ever succeeded
  retryTimer = setTimeout(connect, delay);
}

export function retryNow() { if (!ws) connect(); }

// A /ws command (allow/deny/dismiss/ping); resolves with the server's reply.
export function command(obj) {
  return new Promise((resolve) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) { resolve({ type: 'error', error: 'not connected' }); return; }
    pendingReplies.push(resolve);
    ws.send(JSON.stringify(obj));
  });
}
