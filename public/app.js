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
  const ACK_TIMEOUT_MS = 5000;    // a line not answered by then: the socket is dead, though open
  const RESEND_WINDOW_MS = 10 * 60 * 1000;  // the server remembers a session's lines this long
  const CID_BYTES = 12;           // random bytes in a line's id (cid), besides the time
  const TAB_KEY = 'chatserver.tab';  // sessionStorage: this tab's session and unsent lines
  const CLOSE_REPLACED = 4000;    // the server: this connection's name went to a newer one
  const MAX_ROWS = 1000;          // older rows leave the page
  const GROUP_WINDOW_MS = 5 * 60 * 1000;  // one sender's lines within this read as one block
  const WHO_DELAY_MS = 2000;      // wait this (plus jitter) before asking /who to mend the list...
  const WHO_INTERVAL_MS = 5000;   // ...and at most this often, or 20 ms per member in
  const WHO_INTERVAL_PER_MEMBER_MS = 20;  // a crowd, where everyone asks at once

  // The meta tag may name a path on the page's own host ("/socket"), which is
  // how a reverse proxy serves page and socket on one origin.
  function sameOrigin(address, scheme) {
    if (!address || !address.startsWith('/') || !location.host) return address;
    return `${scheme}//${location.host}${address}`;
  }

  // Where the page connects, first match wins: ?server=, the chat-server meta
  // tag, then ws(s)://<this page's host, or localhost from disk>:8765/.
  // The room is ?room= (default lobby). The name: this tab's, if it was
  // reloaded; else ?name=; else the last one used in this browser.
  function resolveSettings() {
    const query = new URLSearchParams(location.search);
    const meta = document.querySelector('meta[name="chat-server"]');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const server = query.get('server')
      || sameOrigin(meta && meta.content.trim(), scheme)
      || `${scheme}//${location.hostname || 'localhost'}:${DEFAULT_PORT}/`;
    const room = query.get('room') || DEFAULT_ROOM;
    const kept = keptTab.load(server, room);
    return {
      server,
      room,
      name: kept.name || query.get('name') || savedName.get() || null,
      kept,
    };
  }

  const savedName = {  // localStorage may be off (privacy settings): never fatal
    get() { try { return localStorage.getItem(SAVED_NAME_KEY); } catch { return null; } },
    set(name) { try { localStorage.setItem(SAVED_NAME_KEY, name); } catch { /* not kept */ } },
  };

  // What this tab keeps across a reload (sessionStorage: this tab only), per
  // server and room: the key and name that make the reconnect the same
  // session on the server, and the lines not yet acknowledged, with their
  // cids, so that resending them after the reload doubles nothing.
  const keptTab = {
    id: '',
    load(server, room) {
      this.id = `${TAB_KEY} ${server} ${room}`;
      try {
        const kept = JSON.parse(sessionStorage.getItem(this.id));
        if (kept && typeof kept === 'object') return kept;
      } catch { /* nothing kept, or not readable */ }
      return {};
    },
    save(state) {
      try { sessionStorage.setItem(this.id, JSON.stringify(state)); } catch { /* not kept */ }
    },
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
    welcomed: false,       // the socket's welcome came: lines may go
    awaiting: new Set(),   // cids sent on this socket and not yet answered...
    ackTimer: 0,           // ...and the timer that finds the socket dead
    deadLinks: 0,          // ack timeouts in a row, with no answer between
  };

  // The outbox: lines typed and not yet acknowledged, in the order typed,
  // each with its row and its cid. A cid is chosen once, when the line is
  // typed: the server posts a line at most once per cid, so a line resent
  // after a drop (or a reload) that had in fact arrived is not doubled.
  // { cid, text, row, typedAt, sentAt: when first handed to a socket (0:
  //   never), refused: the server's reason, or null }
  const outbox = [];

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

  // A line of ours that is not (yet) a message: "Sending…" until its ack, or
  // refused, with the server's reason and what can be done about it.
  function outgoingRow(entry) {
    const frame = { ...draft(entry.text), id: chat.name || chat.wanted || 'you', ts: entry.typedAt };
    const row = frame.action ? actionRow(frame, true) : chatRow(frame, true);
    row.classList.add(entry.refused === null ? 'sending' : 'refused');
    row.dataset.cid = entry.cid;
    if (entry.refused === null) {
      row.append(el('p', 'state', 'Sending…'));
      return row;
    }
    row.append(el('p', 'state', `Not sent: ${entry.refused}`));
    const actions = el('p', 'row-actions');
    const edit = el('button', 'link-button', 'Edit and resend');
    edit.type = 'button';
    edit.addEventListener('click', () => editRefused(entry));
    const discard = el('button', 'link-button', 'Discard');
    discard.type = 'button';
    discard.addEventListener('click', () => discardRefused(entry));
    actions.append(edit, discard);
    row.append(actions);
    return row;
  }

  // What a line typed will show as once posted, as the server reads it:
  // "/me waves" is an action, "//x" the message "/x", other commands as typed.
  function draft(text) {
    const [verb] = text.split(' ', 1);
    if (verb.toLowerCase() === '/me') return { message: text.slice(verb.length).trim(), action: true };
    if (text.startsWith('//')) return { message: text.slice(1) };
    return { message: text };
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

  // A row from the server goes after everything before it but above our
  // lines still sending (they stay last until the server has them) and our
  // lines acked before their echo came with a later seq. Our own new lines
  // (`mine`) go last.
  function show(row, { announce = '', mine = false } = {}) {
    const list = ui.messages;
    list.insertBefore(row, mine ? null : placeFor(row));
    group(row);
    if (row.nextElementSibling) group(row.nextElementSibling);
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

  function placeFor(row) {
    const seq = Number(row.dataset.seq);  // NaN for a notice: only above lines sending
    for (const later of ui.messages.querySelectorAll(':scope > li.sending, :scope > li.early')) {
      if (later.classList.contains('sending') || Number(later.dataset.seq) > seq) return later;
    }
    return null;
  }

  function unshow(row) {
    const next = row.nextElementSibling;
    row.remove();
    if (next) group(next);
  }

  function group(row) {
    row.classList.toggle('continued', continues(row.previousElementSibling, row));
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
    let acked = null;
    if (Number.isInteger(frame.seq)) {
      if (frame.seq <= chat.lastSeq) return;  // seen already (history after a resume)
      chat.lastSeq = frame.seq;
      history = frame.seq <= chat.historyUpTo;
      acked = rowOf(frame.seq);  // our line, shown since its ack: this is its echo
    }
    const own = frame.id === chat.name;
    const row = frame.action ? actionRow(frame, own) : chatRow(frame, own);
    if (acked) {
      acked.replaceWith(row);
      group(row);
      return;
    }
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
      case 'ack':
        answered(frame.cid);
        onAck(frame);
        return;
      case 'error':
        answered(frame.cid);
        if (!onRefused(frame)) notice(frame.message, 'error', frame.ts);
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
      for (const row of ui.messages.querySelectorAll(':scope > li[data-seq]')) {
        delete row.dataset.seq;  // numbers of the old epoch: a new message may reuse them
        row.classList.remove('early');
      }
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
    link.welcomed = true;
    setState('online');
    if (resumed) notice('Reconnected.', 'info', frame.ts);
    else notice(frame.message, 'info', frame.ts);
    hint(HINT);
    resend();
    keep();
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
    keep();
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

  // Sending, acknowledged: each line typed goes in the outbox with its cid
  // and shows as "Sending…"; it goes out once the socket is welcomed, again
  // after each new welcome until it is answered, and the server answers each
  // one with an ack (its seq) or an error (its reason).

  function queue(text) {
    const entry = {
      cid: newCid(), text, row: null, typedAt: Date.now(), sentAt: 0, refused: null,
    };
    entry.row = outgoingRow(entry);
    outbox.push(entry);
    show(entry.row, { announce: 'Sending…', mine: true });
    keep();
    if (!transmit(entry)) hint('Offline: your message is kept and goes out once the connection is back.');
  }

  function transmit(entry) {
    if (!sendLine(entry.text, entry.cid)) return false;
    entry.sentAt = entry.sentAt || Date.now();
    return true;
  }

  // After a welcome: what is not answered yet goes out again, in order, with
  // the same cids. A line handed to a socket longer ago than the server
  // remembers cids might be posted twice: the user decides instead.
  function resend() {
    for (const entry of outbox) {
      if (entry.refused !== null) continue;
      if (entry.sentAt && Date.now() - entry.sentAt > RESEND_WINDOW_MS) {
        refuse(entry, 'not confirmed for over 10 minutes; it may or may not have arrived');
      } else {
        transmit(entry);
      }
    }
  }

  function entryOf(cid) {
    return outbox.find((entry) => entry.cid === cid) || null;
  }

  function rowOf(seq) {
    return ui.messages.querySelector(`:scope > li[data-seq="${seq}"]`);
  }

  // Accepted: the line's row becomes its message (a command's row goes; what
  // it did shows as notices). If the echo is already shown, that is the one
  // row; else the row waits, marked `early`, for its echo to take its place.
  function onAck(frame) {
    const entry = entryOf(frame.cid);
    if (!entry) return;  // a line the page sent for itself (/who), or answered already
    forget(entry);
    if (!Number.isInteger(frame.seq) || rowOf(frame.seq)) {
      unshow(entry.row);
      return;
    }
    const message = { ...draft(entry.text), id: chat.name, seq: frame.seq, ts: frame.ts };
    const row = message.action ? actionRow(message, true) : chatRow(message, true);
    if (frame.seq > chat.lastSeq) row.classList.add('early');
    entry.row.replaceWith(row);
    group(row);
  }

  // Refused: the line stays, with the reason, to be edited or discarded.
  function onRefused(frame) {
    const entry = entryOf(frame.cid);
    if (!entry || entry.refused !== null) return false;
    refuse(entry, frame.message);
    return true;
  }

  function refuse(entry, reason) {
    entry.refused = reason;
    const row = outgoingRow(entry);
    entry.row.replaceWith(row);
    entry.row = row;
    group(row);
    say(`Not sent: ${reason}`);
    keep();
  }

  function editRefused(entry) {  // back in the box; a new cid when sent again
    forget(entry);
    unshow(entry.row);
    ui.input.value = entry.text;
    ui.input.focus();
  }

  function discardRefused(entry) {
    forget(entry);
    unshow(entry.row);
    ui.input.focus();
  }

  function forget(entry) {
    outbox.splice(outbox.indexOf(entry), 1);
    keep();
  }

  function keep() {
    keptTab.save({
      key: chat.key,
      name: chat.preferred || chat.name || chat.wanted,
      lines: outbox.map(({ cid, text, typedAt, sentAt, refused }) => ({
        cid, text, typedAt, sentAt, refused,
      })),
    });
  }

  // The lines this tab had not got answered before it was reloaded.
  function restore(kept) {
    if (typeof kept.key === 'string') chat.key = kept.key;
    for (const line of Array.isArray(kept.lines) ? kept.lines : []) {
      if (!line || typeof line.cid !== 'string' || typeof line.text !== 'string') continue;
      const entry = {
        cid: line.cid,
        text: line.text,
        row: null,
        typedAt: Number.isFinite(line.typedAt) ? line.typedAt : Date.now(),
        sentAt: Number.isFinite(line.sentAt) ? line.sentAt : 0,
        refused: typeof line.refused === 'string' ? line.refused : null,
      };
      entry.row = outgoingRow(entry);
      outbox.push(entry);
      show(entry.row, { mine: true });
    }
  }

  // 1-64 of A-Z a-z 0-9 _ -, unique to this line: the time and random bytes.
  function newCid() {
    const bytes = crypto.getRandomValues(new Uint8Array(CID_BYTES));
    const random = [...bytes].map((byte) => byte.toString(16).padStart(2, '0')).join('');
    return `${Date.now().toString(36)}-${random}`;
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
      // acks=1: each line goes as {cid, line} and is answered (see sendLine).
      socket = new WebSocket(socketUrl(settings.server, settings.room,
        { ...params, key: chat.key, acks: '1' }));
    } catch (problem) {
      fatal(`Cannot connect: ${problem.message}`);
      return;
    }
    link.socket = socket;
    link.welcomed = false;
    link.welcomeTimer = setTimeout(() => abandon(scheduleRetry), WELCOME_TIMEOUT_MS);
    socket.addEventListener('message', (event) => {
      if (socket === link.socket) receive(event.data);
    });
    socket.addEventListener('close', (event) => {
      if (socket === link.socket) dropped(event.code);
    });
  }

  // `retry`: how to come back (scheduleRetry: after the backoff; connect: now).
  function dropped(code, retry = scheduleRetry) {
    clearTimeout(link.welcomeTimer);
    clearTimeout(link.ackTimer);
    link.ackTimer = 0;
    link.awaiting.clear();  // the lines in it are still in the outbox: resent after the welcome
    link.welcomed = false;
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
    retry();
  }

  // A socket that looks open but answers nothing is dead (the laptop slept,
  // the Wi-Fi changed): drop it now, without waiting for a closing handshake
  // that may never come, and forget it, so that nothing it still says counts.
  function abandon(retry) {
    const socket = link.socket;
    if (!socket) return;
    link.socket = null;
    socket.close();
    dropped(null, retry);
  }

  // Every line sent must be answered within ACK_TIMEOUT_MS of the last answer.
  function awaitAnswer(cid) {
    link.awaiting.add(cid);
    if (!link.ackTimer) link.ackTimer = setTimeout(ackTimedOut, ACK_TIMEOUT_MS);
  }

  function answered(cid) {
    if (!link.awaiting.delete(cid)) return;
    link.deadLinks = 0;
    clearTimeout(link.ackTimer);
    link.ackTimer = link.awaiting.size ? setTimeout(ackTimedOut, ACK_TIMEOUT_MS) : 0;
  }

  function ackTimedOut() {
    link.ackTimer = 0;
    // A dead link: reconnect at once. Again and again with no answer between:
    // the server is struggling, so back off.
    abandon(link.deadLinks++ ? scheduleRetry : connect);
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

  // Send one line on a welcomed socket, as {cid, line} (acks=1): the server
  // answers it with an ack or an error carrying the cid. Lines the page sends
  // for itself (/who, /nick) get a cid of their own and no outbox row.
  function sendLine(text, cid = newCid()) {
    const socket = link.socket;
    if (!socket || !link.welcomed || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(JSON.stringify({ cid, line: text }));
    awaitAnswer(cid);
    return true;
  }

  // The message box: Enter sends. The line leaves the box at once for the
  // outbox, which keeps it (across a reload too) until the server has it.

  function submit() {
    const text = ui.input.value;
    if (!text.trim()) return;
    chat.lastSent = text;
    ui.input.value = '';
    hint(HINT);
    queue(text);
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
    restore(settings.kept);
    connect();
  }

  start();
})();
