// The chat page: talks to chatserver over one WebSocket (protocol: README.md).
//
// A plain script, not a module, so that the page also works opened from disk
// (Chromium refuses module scripts from file://). Everything a peer sends is
// put in the page with textContent, never parsed as HTML.
(() => {
  'use strict';

  const DEFAULT_PORT = 8765;
  const DEFAULT_ROOM = 'lobby';
  const ROOM_NAME = /^[A-Za-z0-9_.-]{1,64}$/;  // as the server checks it
  const NAME_MAX_CHARS = 32;
  const SAVED_NAME_KEY = 'chatserver.name';
  const RETRY_FIRST_MS = 500;     // first retry after a drop, before jitter
  const RETRY_MAX_MS = 30000;     // backoff ceiling
  const WELCOME_TIMEOUT_MS = 10000;  // a connection not welcomed by then is retried
  const CLOSE_REPLACED = 4000;    // the server: this connection's name went to a newer one
  const MAX_ROWS = 1000;          // older rows leave the page
  const GROUP_WINDOW_MS = 5 * 60 * 1000;  // one sender's lines within this read as one block
  const WHO_DELAY_MS = 2000;      // wait this (plus jitter) before asking /who to mend the list...
  const WHO_INTERVAL_MS = 5000;   // ...and at most this often, or 20 ms per member in
  const WHO_INTERVAL_PER_MEMBER_MS = 20;  // a crowd, where everyone asks at once

  // Where the page connects, first match wins: ?server=, the chat-server meta
  // tag, then ws(s)://<this page's host, or localhost from disk>:8765/.
  // The room is ?room= (default lobby); the name ?name=, else the last one used.
  function resolveSettings() {
    const query = new URLSearchParams(location.search);
    const meta = document.querySelector('meta[name="chat-server"]');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const server = query.get('server')
      || (meta && meta.content.trim())
      || `${scheme}//${location.hostname || 'localhost'}:${DEFAULT_PORT}/`;
    return {
      server,
      room: query.get('room') || DEFAULT_ROOM,
      name: query.get('name') || savedName.get() || null,
    };
  }

  const savedName = {  // localStorage may be off (privacy settings): never fatal
    get() { try { return localStorage.getItem(SAVED_NAME_KEY); } catch { return null; } },
    set(name) { try { localStorage.setItem(SAVED_NAME_KEY, name); } catch { /* not kept */ } },
  };

  // The socket URL for a room: ws://HOST:PORT/ROOM?name=&since=&epoch=.
  // Throws on a server address that is not a ws:, wss:, http: or https: URL.
  function socketUrl(server, room, params) {
    const url = new URL(server);
    if (url.protocol === 'http:') url.protocol = 'ws:';
    if (url.protocol === 'https:') url.protocol = 'wss:';
    if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
      throw new Error(`not a ws:// or wss:// address: ${server}`);
    }
    url.pathname = url.pathname.replace(/\/*$/, '/') + room;
    url.search = '';
    url.hash = '';
    for (const [key, value] of Object.entries(params)) {
      if (value !== null && value !== undefined && value !== '') url.searchParams.set(key, value);
    }
    return url.href;
  }

  const $ = (id) => document.getElementById(id);
  const ui = {
    roomName: $('room-name'), status: $('status'), statusText: $('status-text'),
    retry: $('retry'), me: $('me'), messages: $('messages'), jump: $('jump'),
    online: $('online'), onlineCount: $('online-count'), composer: $('composer'),
    input: $('chat'), hint: $('composer-hint'), announcer: $('announcer'),
    nickDialog: $('nick-dialog'), nickForm: $('nick-form'), nickInput: $('nick-input'),
    nickError: $('nick-error'), nickCancel: $('nick-cancel'),
  };
  const HINT = ui.hint.textContent;

  const settings = resolveSettings();
  const chat = {
    name: null,            // our nickname, as the server last told us
    wanted: settings.name, // the name we ask for when we (re)connect
    preferred: null,       // the name we chose, if we hold it with a suffix (alice-2)
    key: null,             // the welcome's key: on a reconnect, our name back
    epoch: null,           // the room's seq numbering we have seen...
    lastSeq: 0,            // ...and the last seq shown: resume from here
    online: new Set(),     // names we know to be here...
    count: 0,              // ...and how many the server says are: the truth
    historyUpTo: 0,        // chat lines up to this seq, after a welcome, are history
    quietWho: 0,           // /who answers we asked for ourselves, not shown
    whoTimer: 0,
    whoAskedAt: -Infinity,
    lastSent: '',
    unread: 0,
  };
  const link = {
    socket: null, attempts: 0, retryTimer: 0, welcomeTimer: 0,
    everOnline: false, url: '',
  };

  // Rows: one function per kind of row. Text only ever goes in as text.

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function timeElement(ts) {
    const when = Number.isFinite(ts) ? new Date(ts) : new Date();
    const sameDay = when.toDateString() === new Date().toDateString();
    const shown = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    const node = el('time', 'time', sameDay ? shown
      : `${when.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${shown}`);
    node.dateTime = when.toISOString();
    node.title = when.toLocaleString();
    return node;
  }

  function nameElement(name) {
    const node = el('bdi', `sender hue-${hue(name)}`, name);  // bdi: an RTL name stays put
    return node;
  }

  function hue(name) {
    let hash = 0;
    for (const char of name) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
    return hash % 8;
  }

  // Text with its http(s) URLs as links; anything else stays text.
  const URL_IN_TEXT = /\bhttps?:\/\/[^\s<>"'`]+/gi;
  function richText(text) {
    const fragment = document.createDocumentFragment();
    let at = 0;
    for (const match of text.matchAll(URL_IN_TEXT)) {
      const candidate = trimUrl(match[0]);
      let href = null;
      try {
        const url = new URL(candidate);
        if (url.protocol === 'http:' || url.protocol === 'https:') href = url.href;
      } catch { /* not a URL after all: leave it as text */ }
      if (!href) continue;
      fragment.append(text.slice(at, match.index));
      const anchor = el('a', 'link', candidate);
      anchor.href = href;
      anchor.target = '_blank';
      anchor.rel = 'noopener noreferrer';
      fragment.append(anchor);
      at = match.index + candidate.length;
    }
    fragment.append(text.slice(at));
    return fragment;
  }

  function trimUrl(candidate) {
    // "see https://x.org/a." ends the sentence, not the URL; keep (a) in wiki links.
    let url = candidate.replace(/[.,;:!?]+$/, '');
    while (url.endsWith(')') && (url.split('(').length < url.split(')').length)) {
      url = url.slice(0, -1).replace(/[.,;:!?]+$/, '');
    }
    return url;
  }

  function chatRow(frame, own) {
    const row = el('li', `msg${own ? ' own' : ''}`);
    row.dataset.sender = frame.id;
    if (Number.isInteger(frame.seq)) row.dataset.seq = frame.seq;
    const head = el('div', 'msg-head');
    head.append(nameElement(frame.id));
    if (own) head.append(el('span', 'you', 'you'));
    head.append(timeElement(frame.ts));
    const text = el('div', 'text');
    text.dir = 'auto';
    text.append(richText(frame.message));
    row.append(head, text);
    return row;
  }

  function actionRow(frame, own) {
    const row = el('li', `msg action${own ? ' own' : ''}`);
    row.dataset.sender = frame.id;
    if (Number.isInteger(frame.seq)) row.dataset.seq = frame.seq;
    const text = el('div', 'text');
    const body = el('span', 'action-text');
    body.dir = 'auto';
    body.append(richText(frame.message));
    text.append(el('span', 'action-mark', '✱ '), nameElement(frame.id), ' ', body);
    row.append(text, timeElement(frame.ts));
    return row;
  }

  // System notices come only from the server's "sys" frames or from the page
  // itself, and look nothing like a chat line: no sender, centred, marked.
  function noticeRow(message, kind, ts) {
    const row = el('li', `notice notice-${kind}`);
    row.append(el('span', 'visually-hidden', kind === 'error' ? 'Error: ' : 'Notice: '));
    const text = el('span', 'text', message);
    text.dir = 'auto';
    row.append(text, timeElement(ts));
    return row;
  }

  function show(row, { announce = '', mine = false } = {}) {
    const list = ui.messages;
    const previous = list.lastElementChild;
    if (continues(previous, row)) row.classList.add('continued');
    list.append(row);
    while (list.childElementCount > MAX_ROWS) list.firstElementChild.remove();
    if (view.atBottom || mine) {
      scrollToEnd();
    } else {
      ui.jump.hidden = false;
    }
    if (announce) say(announce);
  }

  // The conversation sticks to its newest line unless the reader scrolled up
  // to read, also when the window (or a phone's keyboard) changes its size.
  const view = { atBottom: true };

  function scrollToEnd() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
    view.atBottom = true;
    ui.jump.hidden = true;
  }

  function continues(previous, row) {
    if (!previous || !row.classList.contains('msg') || row.classList.contains('action')) return false;
    if (!previous.classList.contains('msg') || previous.classList.contains('action')) return false;
    const gap = Date.parse(row.querySelector('time').dateTime)
      - Date.parse(previous.querySelector('time').dateTime);
    return previous.dataset.sender === row.dataset.sender && gap >= 0 && gap < GROUP_WINDOW_MS;
  }

  function say(text) {  // for screen readers, through the live region
    const line = el('p', '', text);
    ui.announcer.append(line);
    while (ui.announcer.childElementCount > 5) ui.announcer.firstElementChild.remove();
  }

  function notice(message, kind = 'info', ts) {
    show(noticeRow(message, kind, ts), { announce: message });
  }

  // Who is online

  function setOnline(names) {
    chat.online = new Set(names.filter((name) => typeof name === 'string'));
    chat.count = chat.online.size;
    renderOnline();
  }

  function renderOnline() {
    const names = [...chat.online].sort((a, b) => a.localeCompare(b, undefined, { sensitivity: 'base' }));
    const items = names.map((name) => {
      const item = el('li', name === chat.name ? 'person own' : 'person');
      item.append(el('span', 'presence', ''), nameElement(name));
      if (name === chat.name) item.append(el('span', 'you', 'you'));
      return item;
    });
    ui.online.replaceChildren(...items);
    ui.onlineCount.textContent = String(chat.count || names.length);
  }

  // The server's count is the truth. When our list disagrees with it (a
  // crowded room's presence notice names only some, or frames crossed on the
  // way), ask /who a little later, without showing the answer. The delay has
  // jitter and a floor so that a crowd does not ask all at once, again and again.
  function checkCount(count) {
    if (Number.isInteger(count)) chat.count = count;
    renderOnline();
    if (chat.count === chat.online.size || chat.whoTimer) return;
    const interval = Math.max(WHO_INTERVAL_MS, chat.count * WHO_INTERVAL_PER_MEMBER_MS);
    const wait = Math.max(WHO_DELAY_MS * (1 + Math.random()),
      chat.whoAskedAt + interval - performance.now());
    chat.whoTimer = setTimeout(() => {
      chat.whoTimer = 0;
      if (chat.count !== chat.online.size && sendLine('/who')) {
        chat.quietWho += 1;
        chat.whoAskedAt = performance.now();
      }
    }, wait);
  }

  // Frames from the server

  function receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;  // not ours to show
    }
    if (!frame || typeof frame !== 'object' || typeof frame.message !== 'string') return;
    if (frame.type === 'user' && typeof frame.id === 'string') onChat(frame);
    else if (frame.type === 'sys') onSys(frame);
  }

  function onChat(frame) {
    let history = false;
    if (Number.isInteger(frame.seq)) {
      if (frame.seq <= chat.lastSeq) return;  // seen already (history after a resume)
      chat.lastSeq = frame.seq;
      history = frame.seq <= chat.historyUpTo;
    }
    const own = frame.id === chat.name;
    const row = frame.action ? actionRow(frame, own) : chatRow(frame, own);
    const spoken = frame.action ? `${frame.id} ${frame.message}` : `${frame.id}: ${frame.message}`;
    show(row, { announce: history || own ? '' : spoken, mine: own && !history });
    if (!history && document.hidden) {
      chat.unread += 1;
      updateTitle();
    }
  }

  function onSys(frame) {
    const str = (value) => (typeof value === 'string' ? value : null);
    switch (frame.event) {
      case 'welcome':
        onWelcome(frame);
        return;
      case 'join':
        if (str(frame.name)) chat.online.add(frame.name);
        checkCount(frame.count);
        notice(frame.message, 'join', frame.ts);
        return;
      case 'leave':
        if (str(frame.name)) chat.online.delete(frame.name);
        checkCount(frame.count);
        notice(frame.message, 'leave', frame.ts);
        if (str(frame.name)) reclaim(frame.name);
        return;
      case 'presence':  // a crowded room's joins and leaves, gathered
        for (const name of Array.isArray(frame.joined) ? frame.joined : []) {
          if (str(name)) chat.online.add(name);
        }
        for (const name of Array.isArray(frame.left) ? frame.left : []) {
          if (!str(name)) continue;
          chat.online.delete(name);
          reclaim(name);
        }
        checkCount(frame.count);
        notice(frame.message, 'presence', frame.ts);
        return;
      case 'nick':
        if (str(frame.old) && str(frame.name)) {
          chat.online.delete(frame.old);
          chat.online.add(frame.name);
          if (frame.old === chat.name) becomeNamed(frame.name, frame.name);
          renderOnline();
          reclaim(frame.old);
        }
        notice(frame.message, 'nick', frame.ts);
        return;
      case 'who':
        if (Array.isArray(frame.online)) setOnline(frame.online);
        if (chat.quietWho > 0) {
          chat.quietWho -= 1;
          return;
        }
        notice(frame.message, 'info', frame.ts);
        return;
      case 'error':
        notice(frame.message, 'error', frame.ts);
        return;
      case 'gap':
        notice(frame.message, 'gap', frame.ts);
        return;
      default:  // help, shutdown, and whatever a newer server says
        notice(frame.message, 'info', frame.ts);
    }
  }

  function onWelcome(frame) {
    clearTimeout(link.welcomeTimer);
    link.attempts = 0;
    const resumed = chat.epoch !== null;
    if (resumed && frame.epoch !== chat.epoch) {
      notice('The room started over on the server: earlier messages are not in it any more.', 'gap');
      chat.lastSeq = 0;
    }
    chat.epoch = typeof frame.epoch === 'string' ? frame.epoch : null;
    chat.key = typeof frame.key === 'string' ? frame.key : null;
    chat.historyUpTo = Number.isInteger(frame.seq) ? frame.seq : 0;
    chat.quietWho = 0;
    // Remember the name asked for if we got it, or it with a suffix (alice-2):
    // not a guest name handed out because it was refused.
    const name = typeof frame.name === 'string' ? frame.name : '?';
    const chosen = chat.preferred || chat.wanted;  // alice, when we came back as alice-2
    becomeNamed(name, chosen && (name === chosen || name.startsWith(`${chosen}-`)) ? chosen : null);
    setOnline(Array.isArray(frame.online) ? frame.online : [chat.name]);
    link.everOnline = true;
    setState('online');
    if (resumed) notice('Reconnected.', 'info', frame.ts);
    else notice(frame.message, 'info', frame.ts);
    if (ui.input.value.trim()) hint('Back online: press Enter to send your message.');
    else hint(HINT);
  }

  // `remember`: a name the user chose, kept for the next visit.
  function becomeNamed(name, remember) {
    chat.name = name;
    chat.wanted = name;
    if (remember) {
      savedName.set(remember);
      chat.preferred = remember;
    }
    ui.me.textContent = name;
    ui.me.title = `Change your name (now ${name})`;
  }

  // We got our name with a suffix (alice-2: it was taken, perhaps by our own
  // connection that the server has not yet found dead): take it back once
  // it is free. Names are unique regardless of case, as on the server.
  function reclaim(freed) {
    const preferred = chat.preferred;
    if (preferred && chat.name !== preferred && chat.name.startsWith(`${preferred}-`)
        && freed.toLowerCase() === preferred.toLowerCase()) {
      sendLine(`/nick ${preferred}`);
    }
  }

  // The connection: connect, get welcomed, and on a drop, retry with
  // exponential backoff and jitter, resuming after the last seq we showed.

  function connect() {
    clearTimeout(link.retryTimer);
    link.retryTimer = 0;
    setState(link.everOnline ? 'reconnecting' : 'connecting');
    let socket;
    try {
      const params = {
        name: chat.wanted,
        since: chat.epoch !== null ? String(chat.lastSeq) : null,
        epoch: chat.epoch,
      };
      link.url = socketUrl(settings.server, settings.room, params);  // shown: no key
      // The key takes our name back from our old connection, if the server
      // has not yet noticed that it died (otherwise we would be alice-2).
      socket = new WebSocket(socketUrl(settings.server, settings.room,
        { ...params, key: chat.key }));
    } catch (problem) {
      fatal(`Cannot connect: ${problem.message}`);
      return;
    }
    link.socket = socket;
    link.welcomeTimer = setTimeout(() => socket.close(), WELCOME_TIMEOUT_MS);
    socket.addEventListener('message', (event) => {
      if (socket === link.socket) receive(event.data);
    });
    socket.addEventListener('close', (event) => {
      if (socket === link.socket) dropped(event.code);
    });
  }

  function dropped(code) {
    clearTimeout(link.welcomeTimer);
    if (code === CLOSE_REPLACED) {  // our key came back on another connection:
      link.socket = null;           // retrying would take the name back and forth
      fatal('This chat was opened again elsewhere with your name; reload the page to chat here.');
      return;
    }
    const wasOnline = ui.status.dataset.state === 'online';
    link.socket = null;
    clearTimeout(chat.whoTimer);
    chat.whoTimer = 0;
    if (wasOnline) notice('Disconnected from the server. Reconnecting…', 'error');
    scheduleRetry();
  }

  function scheduleRetry() {
    const ceiling = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** link.attempts);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);  // "equal jitter"
    link.attempts += 1;
    link.retryTimer = setTimeout(connect, delay);
    setState('offline', link.everOnline
      ? `Offline: reconnecting in ${Math.ceil(delay / 1000)} s`
      : `Offline: cannot reach ${link.url || settings.server}; trying again in ${Math.ceil(delay / 1000)} s`);
  }

  function retryNow() {
    if (link.retryTimer) {
      link.attempts = 0;
      connect();
    }
  }

  function fatal(message) {
    setState('offline', message);
    ui.retry.hidden = true;
    notice(message, 'error');
  }

  const STATE_TEXT = {
    connecting: 'Connecting…', online: 'Online', reconnecting: 'Reconnecting…', offline: 'Offline',
  };

  function setState(state, text) {
    ui.status.dataset.state = state;
    ui.statusText.textContent = text || STATE_TEXT[state];
    ui.status.title = `Server: ${link.url || settings.server}`;
    ui.retry.hidden = state !== 'offline' || !link.retryTimer;
    document.body.dataset.state = state;
  }

  function sendLine(text) {
    const socket = link.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(text);
    return true;
  }

  // The message box: Enter sends; the text leaves the box only once it was
  // handed to an open socket, so nothing typed while offline is lost.

  function submit() {
    const text = ui.input.value;
    if (!text.trim()) return;
    if (!sendLine(text)) {
      hint('Not connected: your message is kept here. Press Enter again once online.');
      return;
    }
    chat.lastSent = text;
    ui.input.value = '';
    hint(HINT);
  }

  function hint(text) {
    if (ui.hint.textContent !== text) ui.hint.textContent = text;
    ui.hint.classList.toggle('warning', text !== HINT);
  }

  ui.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });

  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === 'ArrowUp' && !ui.input.value && chat.lastSent) {
      event.preventDefault();  // bring back the last line sent, to fix or resend it
      ui.input.value = chat.lastSent;
    }
  });

  // Changing one's name: a small dialog that sends /nick.

  ui.me.addEventListener('click', () => {
    ui.nickInput.value = chat.name || chat.wanted || '';
    ui.nickError.textContent = '';
    ui.nickDialog.showModal();
    ui.nickInput.select();
  });

  ui.nickCancel.addEventListener('click', () => ui.nickDialog.close());

  ui.nickForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = ui.nickInput.value.trim();
    if (!name || /\s/.test(name) || [...name].length > NAME_MAX_CHARS) {
      ui.nickError.textContent = `A name has 1 to ${NAME_MAX_CHARS} characters and no spaces.`;
      return;
    }
    if (name !== chat.name && !sendLine(`/nick ${name}`)) {
      ui.nickError.textContent = 'Not connected: try again once online.';
      return;
    }
    ui.nickDialog.close();
    ui.input.focus();
  });

  // Scrolling, titles, network hints

  ui.messages.addEventListener('scroll', () => {
    const list = ui.messages;
    view.atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 48;
    if (view.atBottom) ui.jump.hidden = true;
  });

  new ResizeObserver(() => {
    if (view.atBottom) scrollToEnd();
  }).observe(ui.messages);

  ui.jump.addEventListener('click', () => {
    scrollToEnd();
    ui.input.focus();
  });

  ui.retry.addEventListener('click', retryNow);

  function updateTitle() {
    const base = `#${settings.room} · Chat`;
    document.title = chat.unread ? `(${chat.unread}) ${base}` : base;
  }

  document.addEventListener('visibilitychange', () => {
    if (document.hidden) return;
    chat.unread = 0;
    updateTitle();
    retryNow();  // back to the tab: no need to wait out the backoff
  });

  window.addEventListener('online', retryNow);

  // Start

  function start() {
    ui.roomName.textContent = settings.room;
    ui.input.placeholder = `Message #${settings.room}`;
    ui.me.textContent = chat.wanted || 'guest';
    updateTitle();
    if (!ROOM_NAME.test(settings.room) || !settings.room.replace(/\./g, '')) {
      fatal(`“${settings.room}” is not a room name: use 1 to 64 letters A-Z a-z, digits, _ . -`);
      return;
    }
    connect();
  }

  start();
})();
