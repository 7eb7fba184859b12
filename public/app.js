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
  const MAX_CHARS = 2000;         // the server's default --max-chars...
  const MAX_FRAME_BYTES = 65536;  // ...and --max-size: checked here before sending,
  // unless the welcome names the server's own (max_chars, max_size).
  const COUNTER_FROM = 0.9;       // the character counter shows past 90% of the limit
  const SAVED_NAME_KEY = 'chatserver.name';
  const ROOMS_KEY = 'chatserver.rooms';      // localStorage: rooms visited, per server
  const DRAFT_KEY = 'chatserver.draft';      // localStorage: the unsent box, per room
  const SETTINGS_KEY = 'chatserver.settings';
  const ROOMS_KEPT = 20;
  const RETRY_FIRST_MS = 500;     // first retry after a drop, before jitter
  const RETRY_MAX_MS = 30000;     // backoff ceiling
  const STABLE_MS = 10000;        // a link up this long resets the backoff
  const WELCOME_TIMEOUT_MS = 10000;  // a connection not welcomed by then is retried
  const ACK_TIMEOUT_MS = 5000;    // a line not answered by then: the socket is dead, though open
  const RESEND_WINDOW_MS = 10 * 60 * 1000;  // the server remembers a session's lines this long
  const RECLAIM_DELAY_MS = 1500;  // a name freed is taken back only if still free after this
  const PRESENCE_SAY_MS = 2000;   // joins and leaves are read out together, this often at most
  const CID_BYTES = 12;           // random bytes in a line's id (cid), besides the time
  const TAB_KEY = 'chatserver.tab';  // sessionStorage: this tab's session and unsent lines
  const TOKEN_KEY = 'chatserver.token';  // sessionStorage: this tab's sign-in token, per server
  const TIMER_MAX_MS = 2 ** 31 - 1;  // setTimeout's longest wait
  const SIGN_IN_HINT_AFTER = 3;   // failed tries before a token holder is told it may have expired
  const OWN_SEQS_KEPT = 1000;     // seqs of our own lines kept across a reload
  const MAX_ROWS = 1000;          // older rows leave the page
  const GROUP_WINDOW_MS = 5 * 60 * 1000;  // one sender's lines within this read as one block
  const WHO_DELAY_MS = 2000;      // wait this (plus jitter) before asking /who to mend the list...
  const WHO_INTERVAL_MS = 5000;   // ...and at most this often, or 20 ms per member in
  const WHO_INTERVAL_PER_MEMBER_MS = 20;  // a crowd, where everyone asks at once
  const TS_MAX = 8.64e15;         // the last millisecond a Date can hold
  const MINUTES_KEPT = 10000;     // minutes already written out, kept for reuse
  const HUES_KEPT = 10000;        // names whose colour was worked out, kept for reuse
  const DAY_LOOKBACK = 50;        // rows a new one looks back for its day's separator
  const NEAR_ROWS_PER_PX = 1 / 16;  // rows kept laid out at the end: one per 16 px of
  const NEAR_ROWS_MORE = 10;        // window height (the smallest row is 24), and 10 more

  // Close codes, and what each means to the person reading the page.
  // `retry`: whether coming back can help (with backoff).
  const CLOSE_REPLACED = 4000;
  const CLOSE_KICKED = 4001;
  const CLOSE_TOO_BIG = 1009;
  const CLOSES = {
    1001: { text: 'The server is restarting or shutting down', retry: true },
    1008: { text: 'The server closed the connection', retry: true },  // + its reason
    [CLOSE_TOO_BIG]: { text: 'A message was too big for the server', retry: true },
    1011: { text: 'The server had an internal error', retry: true },
    1013: { text: 'The server cannot let anyone in right now', retry: true },
    [CLOSE_REPLACED]: { text: 'This chat was opened again elsewhere with your name', retry: false },
    [CLOSE_KICKED]: { text: 'You were removed from the room', retry: false },
  };
  const POLICY_REASONS = {  // 1008's reasons, in words
    flooding: 'you sent too much too fast',
    'too slow': 'the page could not keep up with the room',
  };

  // The meta tag may name a path on the page's own host ("/socket"), which is
  // how a reverse proxy serves page and socket on one origin.
  function sameOrigin(address, scheme) {
    if (!address || !address.startsWith('/') || !location.host) return address;
    return `${scheme}//${location.host}${address}`;
  }

  function hostOf(address) {
    try { return new URL(address).hostname.toLowerCase(); } catch { return null; }
  }

  // Where the page connects: ?server=, else the chat-server meta tag, else
  // ws(s)://<this page's host, or localhost from disk>:8765/. When the page
  // has a meta tag, a ?server= for another host is only a request (`asked`):
  // the user confirms it in the page first, since that server would see the
  // saved name and everything typed. The room is ?room= (default lobby).
  function resolveServer() {
    const query = new URLSearchParams(location.search);
    const tag = document.querySelector('meta[name="chat-server"]');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const meta = sameOrigin(tag ? tag.content.trim() : '', scheme);
    const asked = query.get('server');
    const fallback = `${scheme}//${location.hostname || 'localhost'}:${DEFAULT_PORT}/`;
    if (!asked) return { server: meta || fallback, asked: null };
    if (!meta || hostOf(asked) === hostOf(meta)) return { server: asked, asked: null };
    return { server: meta, asked };
  }

  // The name: this tab's, if it was reloaded; else ?name=; else the last
  // one used in this browser. A sign-in token (?token=, from the site that
  // links to or embeds the page) is taken out of the address bar at once:
  // see takeToken.
  function resolveSettings() {
    const query = new URLSearchParams(location.search);
    const { server, asked } = resolveServer();
    return {
      server, asked, room: query.get('room') || DEFAULT_ROOM, queryName: query.get('name'),
      token: query.get('token'),
    };
  }

  const store = {  // localStorage may be off (privacy settings): never fatal
    get(key) { try { return localStorage.getItem(key); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(key, value); } catch { /* not kept */ } },
    remove(key) { try { localStorage.removeItem(key); } catch { /* not kept */ } },
    json(key) { try { return JSON.parse(this.get(key)); } catch { return null; } },
  };

  const savedName = {
    get() { return store.get(SAVED_NAME_KEY); },
    set(name) { store.set(SAVED_NAME_KEY, name); },
  };

  // What this tab keeps across a reload (sessionStorage: this tab only), per
  // server and room: the key and name that make the reconnect the same
  // session on the server, the lines not yet acknowledged, with their cids,
  // so that resending them after the reload doubles nothing, and the seqs
  // of our own lines in this room's epoch (how the page knows "you").
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

  // This tab's sign-in token: in memory, and in sessionStorage (this tab
  // only, gone with it) under the server it is for, so that a reload keeps
  // it and a link to another server never gets it. Never in localStorage.
  const tabToken = {
    key(server) { return `${TOKEN_KEY} ${server}`; },
    get(server) { try { return sessionStorage.getItem(this.key(server)); } catch { return null; } },
    set(server, token) {
      try { sessionStorage.setItem(this.key(server), token); } catch { /* kept in memory only */ }
    },
  };

  // A ?token= leaves the address bar before anything else happens, so that
  // a link copied from it, a bookmark or the history does not carry it.
  function takeToken() {
    if (settings.token === null) return;
    try {
      const url = new URL(location.href);
      url.searchParams.delete('token');
      history.replaceState(history.state, '', url.href);
    } catch { /* from file:// some browsers refuse: it is still not stored */ }
  }

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

  function validRoom(room) {
    return ROOM_NAME.test(room) && room.replace(/\./g, '') !== '';
  }

  const $ = (id) => document.getElementById(id);
  const ui = {
    roomName: $('room-name'), status: $('status'), statusText: $('status-text'),
    statusDetail: $('status-detail'),
    retry: $('retry'), me: $('me'), messages: $('messages'), jump: $('jump'),
    online: $('online'), onlineCount: $('online-count'), composer: $('composer'),
    input: $('chat'), hint: $('composer-hint'), counter: $('counter'), announcer: $('announcer'),
    nickDialog: $('nick-dialog'), nickForm: $('nick-form'), nickInput: $('nick-input'),
    nickError: $('nick-error'), nickCancel: $('nick-cancel'),
    rooms: $('rooms'), roomForm: $('room-form'), roomInput: $('room-input'),
    roomError: $('room-error'), menu: $('menu'),
    showPresence: $('show-presence'), notify: $('notify'),
    serverPrompt: $('server-prompt'), serverAsked: $('server-asked'), serverOwn: $('server-own'),
    serverGo: $('server-go'), serverGoHost: $('server-go-host'),
    serverStay: $('server-stay'), serverStayHost: $('server-stay-host'),
    topic: $('topic'), modDialog: $('mod-dialog'), modName: $('mod-name'), modQuote: $('mod-quote'),
    modMember: $('mod-member'), modReason: $('mod-reason'), modDuration: $('mod-duration'),
    modDelete: $('mod-delete'), modKick: $('mod-kick'), modBan: $('mod-ban'),
    modCancel: $('mod-cancel'),
  };
  const HINT = ui.hint.textContent;

  const settings = resolveSettings();
  const prefs = { showPresence: true, notify: true, ...(store.json(SETTINGS_KEY) || {}) };
  const chat = {
    name: null,            // our nickname, as the server last told us
    wanted: null,          // the name we ask for when we (re)connect
    preferred: null,       // the name we chose, if we hold it with a suffix (alice-2)
    key: null,             // the welcome's key: on a reconnect, our name back
    epoch: null,           // the room's seq numbering we have seen...
    lastSeq: 0,            // ...and the last seq shown: resume from here
    ownSeqs: new Set(),    // seqs of our own lines (this tab's session), in this epoch
    online: new Set(),     // names we know to be here...
    count: 0,              // ...and how many the server says are: the truth
    historyUpTo: 0,        // chat lines up to this seq, after a welcome, are history
    quietWho: 0,           // /who answers we asked for ourselves, not shown
    whoTimer: 0,
    whoAskedAt: -Infinity,
    reclaimTimer: 0,
    lastSent: '',
    unread: 0,             // lines that came while the tab was hidden...
    mentions: 0,           // ...and how many of them name us
    markNext: false,       // the next line that comes while hidden gets the unread marker
    senders: new Set(),    // names seen speaking: for Tab completion
    verified: new Set(),   // names online that a sign-in token vouches for (the frames say)
    mod: false,            // we moderate this room (the welcome says)
    token: null,           // our sign-in token, if the site gave us one (never shown)
  };
  const link = {
    socket: null, attempts: 0, retryTimer: 0, welcomeTimer: 0, stableTimer: 0,
    everOnline: false, url: '',
    why: '',               // the last close's reason, in words
    welcomed: false,       // the socket's welcome came: lines may go
    awaiting: new Set(),   // cids sent on this socket and not yet answered...
    ackTimer: 0,           // ...and the timer that finds the socket dead
    deadLinks: 0,          // ack timeouts in a row, with no answer between
    removed: false,        // a moderator removed us: come back only when asked to
    removal: null,         // the kick notice about us, if the server sent us one
  };

  // The outbox: lines typed and not yet acknowledged, in the order typed,
  // each with its row and its cid. A cid is chosen once, when the line is
  // typed: the server posts a line at most once per cid, so a line resent
  // after a drop (or a reload) that had in fact arrived is not doubled.
  // { cid, text, row, typedAt, sentAt: when first handed to a socket (0:
  //   never), refused: the server's reason, or null }
  const outbox = [];

  // The longest line and frame the server takes: its defaults, or what its
  // welcome says (a server that names them: see README, The page).
  const limits = { chars: MAX_CHARS, bytes: MAX_FRAME_BYTES };

  // Rows: one function per kind of row. Text only ever goes in as text.

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The rows a history or a crowd brings by the thousand are copies of a
  // blank one (one call to the browser, where making each element is a
  // few), then filled in, text always as text.
  function copied(make) {
    const blank = make();
    return () => blank.cloneNode(true);
  }

  function dayKey(when) {  // the local day, YYYY-MM-DD
    const pad = (n) => String(n).padStart(2, '0');
    return `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())}`;
  }

  const clock = { today: dayKey(new Date()) };

  // Formatters made once: toLocaleTimeString() and friends build a new one
  // on every call, which was most of the cost of rendering a long history.
  const FORMAT = {
    time: new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' }),
    full: new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' }),
    date: new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' }),
    dateYear: new Intl.DateTimeFormat(undefined, { year: 'numeric', month: 'short', day: 'numeric' }),
    day: new Intl.DateTimeFormat(undefined, {
      weekday: 'long', year: 'numeric', month: 'long', day: 'numeric',
    }),
  };

  // A time shows the date too unless it is today; relabel() keeps that true
  // after midnight.
  function timeElement(when, node = el('time', 'time')) {
    node.textContent = minuteOf(when).text;
    node.dateTime = when.toISOString();  // the full date shows on hover: see below
    return node;
  }

  function timeText(when) {
    return minuteOf(when).text;
  }

  // What a time says, and its local day, worked out once per minute: a
  // history of a thousand lines spans a few dozen minutes, and Intl's
  // format() and local dates are the costly part of a row. Keyed by the
  // minute since 1970 (every time zone's offset is in whole minutes since
  // 1972). Forgotten when the day changes (relabel): "today" is another.
  const minutes = new Map();

  function minuteOf(when) {
    const key = Math.floor(when.getTime() / 60000);
    let minute = minutes.get(key);
    if (minute === undefined) {
      const day = dayKey(when);
      let text = FORMAT.time.format(when);
      if (day !== clock.today) {
        const sameYear = when.getFullYear() === new Date().getFullYear();
        text = `${(sameYear ? FORMAT.date : FORMAT.dateYear).format(when)} ${text}`;
      }
      if (minutes.size >= MINUTES_KEPT) minutes.clear();
      minute = { day, text };
      minutes.set(key, minute);
    }
    return minute;
  }

  function dayLabel(key) {
    const [year, month, day] = key.split('-').map(Number);
    const date = new Date(year, month - 1, day);
    if (key === clock.today) return 'Today';
    const yesterday = new Date();
    yesterday.setDate(yesterday.getDate() - 1);
    if (key === dayKey(yesterday)) return 'Yesterday';
    return FORMAT.day.format(date);
  }

  function daySeparator(key) {
    const row = el('li', 'day');
    row.dataset.day = key;
    row.append(el('span', 'day-label', dayLabel(key)));
    return row;
  }

  // After midnight (or when the tab wakes up on another day), "Today" and
  // the times that lost their date are written again.
  function relabel() {
    const today = dayKey(new Date());
    if (today !== clock.today) {
      clock.today = today;
      minutes.clear();
      for (const label of ui.messages.querySelectorAll(':scope > li.day')) {
        label.firstElementChild.textContent = dayLabel(label.dataset.day);
      }
      for (const time of ui.messages.querySelectorAll('time')) {
        time.textContent = timeText(new Date(time.dateTime));
      }
    }
    const next = new Date();
    next.setHours(24, 0, 1, 0);
    clearTimeout(clock.timer);
    clock.timer = setTimeout(relabel, next - Date.now());
  }

  function nameElement(name, node = el('bdi')) {  // bdi: an RTL name stays put
    node.className = `sender hue-${hue(name)}`;
    node.textContent = name;
    return node;
  }

  // The mark of a name a sign-in token vouches for. An element, never a
  // character of the name: a guest called "alice✓" types a glyph in its
  // own name's colour, this is a filled badge drawn by style.css, with a
  // label for screen readers. Shown only where the server's frames say so.
  function verifiedBadge() {
    const node = el('span', 'verified');
    node.setAttribute('role', 'img');
    node.setAttribute('aria-label', 'verified');
    node.title = 'Verified: the site vouches for this name';
    return node;
  }

  // A moderator's button on a message or a member of the online list: small
  // ("⋯"), named in full for screen readers.
  function modButton(label) {
    const button = el('button', 'mod-button', '⋯');
    button.type = 'button';
    button.title = label;
    button.setAttribute('aria-label', label);
    button.setAttribute('aria-haspopup', 'dialog');
    return button;
  }

  const hues = new Map();  // worked out once per name, not per row

  function hue(name) {
    let known = hues.get(name);
    if (known === undefined) {
      let hash = 0;
      for (const char of name) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
      known = hash % 8;
      if (hues.size >= HUES_KEPT) hues.clear();
      hues.set(name, known);
    }
    return known;
  }

  // Text with its http(s) URLs as links; anything else stays text. A link
  // shows the host as the browser will open it (punycode for a look-alike
  // such as аpple.com with a Cyrillic а), no user name or password, and no
  // bidi or zero-width characters that could disguise it.
  const URL_IN_TEXT = /\bhttps?:\/\/[^\s<>"'`]+/gi;
  const LINK = copied(() => {
    const anchor = el('a', 'link');
    anchor.target = '_blank';
    anchor.rel = 'noopener noreferrer';
    return anchor;
  });
  const INVISIBLE = /[\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u2069\uFEFF]/g;
  // Quick tests first, for the common case: most lines have no link, most
  // links no invisible character.
  const MAY_LINK = /https?:\/\//i;
  const HAS_INVISIBLE = new RegExp(INVISIBLE.source);

  // Appends to `node`: the text as text nodes, its URLs as links.
  function richText(text, node) {
    if (!MAY_LINK.test(text)) {
      if (text) node.append(text);
      return;
    }
    let at = 0;
    URL_IN_TEXT.lastIndex = 0;  // exec, not matchAll: that copies the RegExp on every call
    for (let match = URL_IN_TEXT.exec(text); match; match = URL_IN_TEXT.exec(text)) {
      const candidate = trimUrl(match[0]);
      const clean = HAS_INVISIBLE.test(candidate) ? candidate.replace(INVISIBLE, '') : candidate;
      let url = null;
      try {
        url = new URL(clean);
        if (url.protocol !== 'http:' && url.protocol !== 'https:') url = null;
      } catch { /* not a URL after all: leave it as text */ }
      if (!url) continue;
      if (clean.includes('@')) {  // the only way in for a user name or password
        url.username = '';
        url.password = '';
      }
      if (match.index > at) node.append(text.slice(at, match.index));
      const anchor = LINK();
      anchor.textContent = linkText(clean, url);
      anchor.href = url.href;
      node.append(anchor);
      at = match.index + candidate.length;
    }
    if (at < text.length) node.append(text.slice(at));
  }

  // What a link says: as typed (without invisible characters), but with the
  // host the browser will open.
  function linkText(clean, url) {
    const authority = clean.indexOf('//') + 2;
    let end = clean.slice(authority).search(/[/?#\\]/);
    end = end < 0 ? clean.length : authority + end;
    return `${url.protocol}//${url.host}${clean.slice(end)}`;
  }

  function trimUrl(candidate) {
    if (!/[.,;:!?)]$/.test(candidate)) return candidate;
    // "see https://x.org/a." ends the sentence, not the URL; keep (a) in wiki links.
    let url = candidate.replace(/[.,;:!?]+$/, '');
    while (url.endsWith(')') && (url.split('(').length < url.split(')').length)) {
      url = url.slice(0, -1).replace(/[.,;:!?]+$/, '');
    }
    return url;
  }

  // A message row's sender, standing, seq and day as attributes, and its
  // time, in `time`. What grouping compares (see continues) is also kept
  // aside, read without asking the DOM, as it is for each of a thousand rows.
  const rowFacts = new WeakMap();  // row -> { time, sender, verified, action }

  function stamp(row, frame, time) {
    const when = Number.isFinite(frame.ts) ? new Date(frame.ts) : new Date();
    row.setAttribute('data-sender', frame.id);
    if (frame.verified === true) row.setAttribute('data-verified', '1');
    if (Number.isInteger(frame.seq)) row.setAttribute('data-seq', frame.seq);
    row.setAttribute('data-day', minuteOf(when).day);
    rowFacts.set(row, {
      time: when.getTime(), sender: frame.id, verified: frame.verified === true, action: !!frame.action,
    });
    timeElement(when, time);
  }

  const CHAT_ROW = copied(() => {
    const row = el('li', 'msg');
    const head = el('div', 'msg-head');
    head.append(el('bdi'), el('time', 'time'));
    const text = el('div', 'text');
    text.dir = 'auto';
    row.append(head, text);
    return row;
  });

  function chatRow(frame, own) {
    const row = CHAT_ROW();
    if (own) row.className = 'msg own';
    const head = row.firstChild;
    const time = head.lastChild;
    stamp(row, frame, time);
    nameElement(frame.id, head.firstChild);
    if (frame.verified === true) time.before(verifiedBadge());
    if (own) time.before(el('span', 'you', 'you'));
    richText(frame.message, row.lastChild);
    if (chat.mod && Number.isInteger(frame.seq)) row.append(messageModButton(frame));
    return row;
  }

  // Beside the bubble, not in its head: a line that continues its sender's
  // block has its head hidden, and the button must still be seen when reached.
  function messageModButton(frame) {
    return modButton(`Moderate the message from ${frame.id}`);
  }

  function actionRow(frame, own) {
    const row = el('li', `msg action${own ? ' own' : ''}`);
    const time = el('time', 'time');
    stamp(row, frame, time);
    const text = el('div', 'text');
    const body = el('span', 'action-text');
    body.dir = 'auto';
    richText(frame.message, body);
    text.append(el('span', 'action-mark', '✱ '), nameElement(frame.id));
    if (frame.verified === true) text.append(verifiedBadge());
    text.append(' ', body);
    row.append(text, time);
    if (chat.mod && Number.isInteger(frame.seq)) row.append(messageModButton(frame));
    return row;
  }

  function messageRow(frame, own) {
    return frame.action ? actionRow(frame, own) : chatRow(frame, own);
  }

  // A line of ours that is not (yet) a message: "Sending…" until its ack, or
  // refused, with the server's reason and what can be done about it.
  function outgoingRow(entry) {
    const frame = { ...draft(entry.text), id: chat.name || chat.wanted || 'you', ts: entry.typedAt };
    const row = messageRow(frame, true);
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
  const NOTICE_ROW = copied(() => {
    const row = el('li');  // no day: separators are for messages
    const text = el('span', 'text');
    text.dir = 'auto';
    row.append(el('span', 'visually-hidden'), text, el('time', 'time'));
    return row;
  });

  function noticeRow(message, kind, ts) {
    const row = NOTICE_ROW();
    row.className = `notice notice-${kind}`;
    const [said, text, time] = row.children;
    said.textContent = kind === 'error' ? 'Error: ' : 'Notice: ';
    text.textContent = message;
    timeElement(Number.isFinite(ts) ? new Date(ts) : new Date(), time);
    return row;
  }

  // A row from the server goes after everything before it but above our
  // lines still sending (they stay last until the server has them) and our
  // lines acked before their echo came with a later seq. Our own new lines
  // (`mine`) go last. Layout work (trimming, day separators, scrolling)
  // waits for the next frame, once for however many rows came meanwhile;
  // at the end of the conversation, old rows leave at once (trimSoon).
  function show(row, { announce = '', mine = false } = {}) {
    const list = ui.messages;
    const before = mine ? null : placeFor(row);
    list.insertBefore(row, before);
    if (before) view.daysToMend = true;  // the row below may now need a separator
    keepNear(row);
    if (row.hasAttribute('data-day')) separateDay(row);
    group(row);
    if (row.nextElementSibling) group(row.nextElementSibling);
    if (mine) view.atBottom = true;
    else if (!view.atBottom && row.classList.contains('msg')) ui.jump.hidden = false;
    if (announce) say(announce);
    settle();
    if (view.atBottom) trimSoon();
  }

  // The conversation sticks to its newest line unless the reader scrolled up
  // to read, also when the window (or a phone's keyboard) changes its size.
  // daysToMend: a row was put above others, replaced or taken out, so the
  // day separators may be off until mendDays (the common case, rows added at
  // the end, gets its separator from separateDay and needs no walk of 1,000 rows).
  const view = {
    atBottom: true, frame: 0, endTop: -1, daysToMend: false, trimming: false,
  };

  // A hidden tab gets no animation frames: a timer then, so that a busy
  // room's rows are still trimmed while nobody looks.
  function settle() {
    if (view.frame) return;
    view.timed = document.hidden;
    view.frame = view.timed ? setTimeout(settled, 200) : requestAnimationFrame(settled);
  }

  function resettle() {  // the tab was hidden or shown: wait the right way
    if (!view.frame) return;
    if (view.timed) clearTimeout(view.frame);
    else cancelAnimationFrame(view.frame);
    view.frame = 0;
    settle();
  }

  // Once a frame: drop the oldest rows past MAX_ROWS without moving what the
  // reader is looking at (no browser-dependent scroll anchoring: see
  // style.css), mend the day separators and grouping, then follow the end.
  function settled() {
    view.frame = 0;
    const list = ui.messages;
    if (tooMany()) {
      const anchor = view.atBottom ? null : list.lastElementChild;
      const before = anchor ? anchor.getBoundingClientRect().top : 0;
      dropOldest();
      if (anchor) list.scrollTop += anchor.getBoundingClientRect().top - before;
    }
    if (view.daysToMend) mendDays();
    if (view.atBottom) scrollToEnd();
  }

  // At the end of the conversation there is no place to keep: the oldest
  // rows leave once the task that brought new ones is done (a history's
  // thousand rows come in one), before the browser lays the list out. In
  // the next frame they would cost a second layout of every row.
  function trimSoon() {
    if (view.trimming) return;
    view.trimming = true;
    queueMicrotask(() => {
      view.trimming = false;
      if (view.atBottom && tooMany()) dropOldest();
    });
  }

  // A day's separator at the top is not counted: it stays above the rest
  // of its day's rows, so that trimming never has to put one back.
  function tooMany() {
    const list = ui.messages;
    const top = list.firstElementChild;
    return list.childElementCount - MAX_ROWS - (top && isDay(top) ? 1 : 0) > 0;
  }

  // The oldest rows go until there are MAX_ROWS, the separator at the top
  // with the last row of its day.
  function dropOldest() {
    const list = ui.messages;
    while (tooMany()) {
      const top = list.firstElementChild;
      const oldest = isDay(top) ? top.nextElementSibling : top;
      earlyRows.delete(oldest);
      oldest.remove();
      dropEmptyDay();
    }
    const top = list.firstElementChild;
    if (!top) return;
    group(top);  // the first row shows its sender again
    if (top.nextElementSibling) group(top.nextElementSibling);
  }

  function dropEmptyDay() {
    const top = ui.messages.firstElementChild;
    if (!top || !isDay(top)) return;
    let node = top.nextElementSibling;
    for (let i = 0; node; i += 1, node = node.nextElementSibling) {
      if (i === DAY_LOOKBACK) {  // only notices nearby: mendDays decides
        view.daysToMend = true;
        return;
      }
      const day = node.getAttribute('data-day');
      if (day === null) continue;  // a notice: no day
      if (!isDay(node) && day === top.getAttribute('data-day')) return;  // a row of its day
      break;
    }
    top.remove();
  }

  function isDay(row) {
    return row.classList.contains('day');
  }

  // The rows before the newest screenful or two are laid out only once they
  // come near the view (style.css, .far): a history of a thousand rows
  // costs the rows in view, not a thousand. The newest rows shown stay laid
  // out, so that the end, where the view sits, is exactly where it seems.
  // Done as each row comes, not once a frame: the browser may lay the page
  // out before the frame's callbacks run, and would lay out every new row.
  const nearRows = [];  // the newest rows shown, oldest first
  const near = { count: 0 };  // how many: enough to fill the window's height

  function keepNear(row) {
    nearRows.push(row);
    while (nearRows.length > near.count) {
      const far = nearRows.shift();
      far.classList.add('far');
      farSizes.observe(far);
    }
  }

  // A far row takes its real height when it is first laid out, as it comes
  // into view: from an estimate, often another. One above the view would
  // move what the reader is looking at (scrolling up, rows would jump past),
  // so the page keeps the reader's place itself, as it does when old rows
  // go (no scroll anchoring: see style.css), and at the end it stays there.
  // Called after layout, before paint: nothing is seen to move.
  const farHeights = new WeakMap();
  const farSizes = new ResizeObserver((entries) => {
    const list = ui.messages;
    const top = list.getBoundingClientRect().top;
    let shift = 0;
    for (let i = 0; i < entries.length; i += 1) {  // a history's first: 1,000 at once
      const row = entries[i].target;
      const size = entries[i].borderBoxSize[0];
      if (!row.isConnected) {  // gone (trimmed, deleted, another room)
        farSizes.unobserve(row);
        continue;
      }
      const before = farHeights.get(row);
      farHeights.set(row, size.blockSize);
      if (before !== undefined && row.getBoundingClientRect().top < top) shift += size.blockSize - before;
    }
    if (view.atBottom) scrollToEnd();
    else if (shift) list.scrollTop += shift;
  });

  function countNear() {
    near.count = Math.ceil(window.innerHeight * NEAR_ROWS_PER_PX) + NEAR_ROWS_MORE;
  }

  countNear();
  window.addEventListener('resize', countNear);

  // A row that starts a day gets its separator as it comes: mendDays would
  // put it in the next frame, and every row below it would be laid out
  // again. Where the day above is not found nearby, mendDays decides.
  function separateDay(row) {
    const day = row.getAttribute('data-day');
    let node = row.previousElementSibling;
    for (let i = 0; node; i += 1, node = node.previousElementSibling) {
      if (i === DAY_LOOKBACK) {
        view.daysToMend = true;
        return;
      }
      const above = node.getAttribute('data-day');
      if (above === day) return;  // its day's separator, or a message of that day
      if (above !== null) break;  // a message of another day
    }
    ui.messages.insertBefore(daySeparator(day), row);
  }

  // One separator above the first row of each day, and no other.
  function mendDays() {
    view.daysToMend = false;
    let lastDay = null;
    let separator = null;  // the separator just passed, not yet claimed
    for (let node = ui.messages.firstElementChild; node;) {
      const next = node.nextElementSibling;
      const day = node.getAttribute('data-day');
      if (node.classList.contains('day')) {
        if (separator) separator.remove();
        separator = node;
      } else if (day && day !== lastDay) {
        if (!separator || separator.getAttribute('data-day') !== day) {
          if (separator) separator.remove();
          ui.messages.insertBefore(daySeparator(day), node);
          group(node);
        }
        separator = null;
        lastDay = day;
      } else if (day && separator) {
        separator.remove();
        separator = null;
        group(node);
      }
      node = next;
    }
    if (separator) separator.remove();
  }

  function scrollToEnd() {
    const list = ui.messages;
    list.scrollTop = list.scrollHeight;
    view.endTop = list.scrollTop;  // see the scroll listener
    view.atBottom = true;
    ui.jump.hidden = true;
  }

  // Our lines acked before their echo came. Kept apart, with the outbox,
  // so that the common case (nothing sending, nothing early) costs no
  // selector query per row.
  const earlyRows = new Set();

  function placeFor(row) {
    if (!outbox.length && !earlyRows.size) return null;
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
    view.daysToMend = true;
    settle();
  }

  // A row in place of another (a line of ours acked, refused, or its echo).
  function replaceRow(old, row) {
    old.replaceWith(row);
    group(row);
    view.daysToMend = true;
  }

  function group(row) {
    const continued = continues(row.previousElementSibling, row);
    if (row.classList.contains('continued') === continued) return;
    row.classList.toggle('continued', continued);
    // A change of height the page makes, not one for farSizes to make up for
    // (trimming keeps the reader's place with it already): a new start.
    farHeights.delete(row);
  }

  function continues(previous, row) {
    const facts = previous ? rowFacts.get(row) : undefined;
    const above = facts ? rowFacts.get(previous) : undefined;
    if (!above || facts.action || above.action) return false;  // not two chat lines
    const gap = facts.time - above.time;
    // Same name and same standing: a guest who took a verified member's name
    // after it left must not pass as the rest of its block (no head, no badge).
    return above.sender === facts.sender && above.verified === facts.verified
      && gap >= 0 && gap < GROUP_WINDOW_MS;
  }


  function say(text) {  // for screen readers, through the live region
    const line = el('p', '', text);
    ui.announcer.append(line);
    while (ui.announcer.childElementCount > 5) ui.announcer.firstElementChild.remove();
  }

  function notice(message, kind = 'info', ts) {
    show(noticeRow(message, kind, ts), { announce: message });
  }

  // Joins and leaves are shown one by one but read out together: a busy
  // room would otherwise talk over everything else.
  const presenceSay = { joined: [], left: [], timer: 0 };

  function presenceNotice(message, kind, ts, joined, left) {
    show(noticeRow(message, kind, ts));
    const others = (names) => names.filter((name) => name !== chat.name);
    presenceSay.joined.push(...others(joined));
    presenceSay.left.push(...others(left));
    if (!presenceSay.timer) presenceSay.timer = setTimeout(sayPresence, PRESENCE_SAY_MS);
  }

  function sayPresence() {
    presenceSay.timer = 0;
    const some = (names) => (names.length > 3
      ? `${names.slice(0, 3).join(', ')} and ${names.length - 3} others` : names.join(', '));
    const parts = [];
    if (presenceSay.joined.length) parts.push(`${some(presenceSay.joined)} joined`);
    if (presenceSay.left.length) parts.push(`${some(presenceSay.left)} left`);
    presenceSay.joined = [];
    presenceSay.left = [];
    if (parts.length && prefs.showPresence) say(parts.join('; '));
  }

  // Who is online: a sorted list changed one name at a time (a crowded
  // room's joins must not rebuild it each time), rebuilt on a welcome or /who.

  const collator = new Intl.Collator(undefined, { sensitivity: 'base' });
  const people = { sorted: [], items: new Map() };

  const PERSON_ITEM = copied(() => {
    const item = el('li', 'person');
    item.append(el('span', 'presence', ''), el('bdi'));
    return item;
  });

  function personItem(name) {
    const item = PERSON_ITEM();
    if (name === chat.name) item.className = 'person own';
    item.setAttribute('data-name', name);
    nameElement(name, item.lastChild);
    if (chat.verified.has(name)) item.append(verifiedBadge());
    if (name === chat.name) item.append(el('span', 'you', 'you'));
    else if (chat.mod) item.append(modButton(`Moderate ${name}`));
    return item;
  }

  function setOnline(names) {
    chat.online = new Set(names);
    chat.count = chat.online.size;
    renderOnline();
  }

  function renderOnline() {
    people.sorted = [...chat.online].sort(collator.compare);
    people.items = new Map(people.sorted.map((name) => [name, personItem(name)]));
    ui.online.replaceChildren(...people.items.values());
    countOnline();
  }

  function countOnline() {
    ui.onlineCount.textContent = String(chat.count || chat.online.size);
  }

  function arrive(name) {
    if (chat.online.has(name)) {  // known: its badge may have changed
      const item = personItem(name);
      people.items.get(name).replaceWith(item);
      people.items.set(name, item);
      return;
    }
    chat.online.add(name);
    let low = 0;
    let high = people.sorted.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (collator.compare(people.sorted[middle], name) <= 0) low = middle + 1;
      else high = middle;
    }
    const item = personItem(name);
    ui.online.insertBefore(item, people.items.get(people.sorted[low]) || null);
    people.sorted.splice(low, 0, name);
    people.items.set(name, item);
  }

  function depart(name) {
    if (!chat.online.delete(name)) return;
    people.sorted.splice(people.sorted.indexOf(name), 1);
    people.items.get(name).remove();
    people.items.delete(name);
  }

  // The server's count is the truth. When our list disagrees with it (a
  // crowded room's presence notice names only some, or frames crossed on the
  // way), ask /who a little later, without showing the answer. The delay has
  // jitter and a floor so that a crowd does not ask all at once, again and again.
  function checkCount(count) {
    if (Number.isInteger(count)) chat.count = count;
    countOnline();
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

  // Frames from the server. Each is checked whole before anything in it is
  // used: a frame with one absurd field (a ts past the year 275760, a seq
  // that is not a whole number) is ignored, never half applied.

  const isText = (value) => typeof value === 'string';
  const isTs = (value) => Number.isSafeInteger(value) && value >= 0 && value <= TS_MAX;
  const isSeq = (value) => Number.isSafeInteger(value) && value > 0;
  const isCount = (value) => Number.isSafeInteger(value) && value >= 0;
  const isNames = (value) => Array.isArray(value) && value.every(isText);
  const isSeqOrNull = (value) => value === null || isSeq(value);
  const isFlag = (value) => typeof value === 'boolean';
  const isTsOrNull = (value) => value === null || isTs(value);

  // Per kind of frame: field -> [check, required]. Fields not named may be
  // anything (a newer server may add some); named ones must pass.
  const FIELDS = {
    user: {
      id: [isText, true], seq: [isSeq, false], action: [isFlag, false], verified: [isFlag, false],
    },
    welcome: {
      name: [isText, true], online: [isNames, false], seq: [isCount, false],
      epoch: [isText, false], key: [isText, false],
      max_chars: [isSeq, false], max_size: [isSeq, false],
      verified: [isNames, false], topic: [isText, false], mod: [isFlag, false],
    },
    join: { name: [isText, true], count: [isCount, false], verified: [isFlag, false] },
    leave: { name: [isText, true], count: [isCount, false], verified: [isFlag, false] },
    nick: { old: [isText, true], name: [isText, true], verified: [isFlag, false] },
    presence: {
      joined: [isNames, false], left: [isNames, false], count: [isCount, false],
      more_joined: [isCount, false], more_left: [isCount, false], verified: [isNames, false],
    },
    who: { online: [isNames, false], count: [isCount, false], verified: [isNames, false] },
    kick: {
      name: [isText, true], by: [isText, false], reason: [isText, false],
      ban: [isFlag, false], until: [isTsOrNull, false],
    },
    topic: { topic: [isText, true], by: [isText, false] },
    delete: { seq: [isSeq, true], by: [isText, false] },
    ack: { cid: [isText, true], seq: [isSeqOrNull, false] },
    error: { cid: [isText, false] },
    gap: { missed: [isCount, false] },
  };
  const COMMON = { message: [isText, true], ts: [isTs, false], room: [isText, false] };
  // The same as lists of { field, check, required }, made once, not per
  // frame, and read with a plain loop: a history's thousand frames are
  // checked before V8 has optimized anything, where destructuring is slow.
  const asRules = (fields) => Object.entries(fields)
    .map(([field, [check, required]]) => ({ field, check, required }));
  const COMMON_RULES = asRules(COMMON);
  const RULES = new Map(Object.entries(FIELDS)
    .map(([kind, fields]) => [kind, asRules({ ...COMMON, ...fields })]));

  function valid(frame) {
    if (!frame || typeof frame !== 'object' || Array.isArray(frame)) return false;
    let rules;
    if (frame.type === 'user') rules = RULES.get('user');
    else if (frame.type === 'sys' && isText(frame.event)) rules = RULES.get(frame.event) || COMMON_RULES;
    else return false;
    for (let i = 0; i < rules.length; i += 1) {
      const rule = rules[i];
      const value = frame[rule.field];
      if (value === undefined ? rule.required : !rule.check(value)) return false;
    }
    return true;
  }

  function receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;  // not ours to show
    }
    if (!valid(frame)) return;
    if (frame.type === 'user') onChat(frame);
    else onSys(frame);
  }

  // Ours: a line this tab's session sent (its seq came in an ack), or the
  // echo of a line in flight on this socket under our present name, whose
  // ack is still to come. Never decided by the name alone.
  function isOwn(frame) {
    if (Number.isInteger(frame.seq) && chat.ownSeqs.has(frame.seq)) return true;
    if (frame.id !== chat.name) return false;
    return outbox.some((entry) => {
      if (entry.refused !== null || !link.awaiting.has(entry.cid)) return false;
      const line = draft(entry.text);
      return line.message === frame.message && !!line.action === !!frame.action;
    });
  }

  // Your name as a word, or @name, in any case.
  const mentionPatterns = new Map();
  function mentionsUs(frame) {
    const { name, preferred } = chat;
    return (!!name && mentionPattern(name).test(frame.message))
      || (!!preferred && mentionPattern(preferred).test(frame.message));
  }

  function mentionPattern(name) {
    if (!mentionPatterns.has(name)) {
      const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      mentionPatterns.set(name,
        new RegExp(`(?:^|[^\\p{L}\\p{N}_-])@?${escaped}(?![\\p{L}\\p{N}_-])`, 'iu'));
    }
    return mentionPatterns.get(name);
  }

  function onChat(frame) {
    let history = false;
    let acked = null;
    if (Number.isInteger(frame.seq)) {
      if (frame.seq <= chat.lastSeq) return;  // seen already (history after a resume)
      chat.lastSeq = frame.seq;
      history = frame.seq <= chat.historyUpTo;
      acked = earlyRows.size ? rowOf(frame.seq) : null;  // our line, shown since its ack: its echo
    }
    chat.senders.add(frame.id);
    const own = isOwn(frame);
    const row = messageRow(frame, own);
    if (acked) {
      earlyRows.delete(acked);
      replaceRow(acked, row);
      return;
    }
    const mention = !own && mentionsUs(frame);
    if (mention) row.classList.add('mention');
    if (!history && !own && document.hidden) {
      if (chat.markNext) {
        chat.markNext = false;
        for (const old of ui.messages.querySelectorAll(':scope > li.unread-marker')) old.remove();
        ui.messages.insertBefore(el('li', 'unread-marker', 'New since you left'), placeFor(row));
      }
      chat.unread += 1;
      if (mention) {
        chat.mentions += 1;
        notify(frame);
      }
      updateTitle();
    }
    let spoken = '';
    if (!history && !own) spoken = frame.action ? `${frame.id} ${frame.message}` : `${frame.id}: ${frame.message}`;
    show(row, { announce: spoken, mine: own && !history });
  }

  // A desktop notification for a mention while the tab is hidden, if the
  // user allowed them (asked on a gesture: see askToNotify) and left them on.
  function notify(frame) {
    if (!prefs.notify || typeof Notification === 'undefined'
        || Notification.permission !== 'granted') return;
    try {
      const note = new Notification(`${frame.id} mentioned you in #${settings.room}`, {
        body: frame.message.slice(0, 200), tag: `chat-${settings.room}`,
      });
      note.addEventListener('click', () => {
        window.focus();
        note.close();
      });
    } catch { /* some browsers allow them only from a service worker */ }
  }

  function askToNotify() {
    if (prefs.notify && typeof Notification !== 'undefined' && Notification.permission === 'default') {
      Notification.requestPermission().catch(() => {});
    }
  }

  function onSys(frame) {
    switch (frame.event) {
      case 'welcome':
        onWelcome(frame);
        return;
      case 'join':
        vouch(frame.name, frame.verified === true);
        arrive(frame.name);
        cancelReclaim(frame.name);
        checkCount(frame.count);
        presenceNotice(frame.message, 'join', frame.ts, [frame.name], []);
        return;
      case 'leave':
        chat.verified.delete(frame.name);
        depart(frame.name);
        checkCount(frame.count);
        presenceNotice(frame.message, 'leave', frame.ts, [], [frame.name]);
        reclaimLater(frame.name);
        return;
      case 'presence': {  // a crowded room's joins and leaves, gathered
        const joined = frame.joined || [];
        const left = frame.left || [];
        const vouched = new Set(frame.verified || []);
        for (const name of left) chat.verified.delete(name);
        for (const name of joined) {
          vouch(name, vouched.has(name));
          arrive(name);
          cancelReclaim(name);
        }
        for (const name of left) {
          depart(name);
          reclaimLater(name);
        }
        checkCount(frame.count);
        presenceNotice(frame.message, 'presence', frame.ts, joined, left);
        return;
      }
      case 'nick':
        chat.verified.delete(frame.old);
        vouch(frame.name, frame.verified === true);
        depart(frame.old);
        arrive(frame.name);
        cancelReclaim(frame.name);
        if (frame.old === chat.name) {
          becomeNamed(frame.name, frame.name);
          renderOnline();
        }
        reclaimLater(frame.old);
        notice(frame.message, 'nick', frame.ts);
        return;
      case 'who':
        if (frame.verified) chat.verified = new Set(frame.verified);
        if (frame.online) setOnline(frame.online);
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
      case 'kick':
        onKick(frame);
        return;
      case 'topic':
        showTopic(frame.topic);
        notice(frame.message, 'topic', frame.ts);
        return;
      case 'delete': {  // a moderator took a message out: it goes from the view too
        const row = rowOf(frame.seq);
        if (row) {
          earlyRows.delete(row);
          unshow(row);
        }
        notice(frame.message, 'delete', frame.ts);
        return;
      }
      default:  // help, shutdown, and whatever a newer server says
        notice(frame.message, 'info', frame.ts);
    }
  }

  function vouch(name, verified) {
    if (verified) chat.verified.add(name);
    else chat.verified.delete(name);
  }

  // Someone was removed by a moderator: gone from the list (there is no
  // leave notice). If it is us, the server closes our socket with 4001
  // next: what the notice says (a ban, until when) is told then.
  function onKick(frame) {
    if (frame.name === chat.name) {
      link.removal = frame;
      return;
    }
    chat.verified.delete(frame.name);
    if (chat.online.has(frame.name)) {
      depart(frame.name);
      chat.count = Math.max(0, chat.count - 1);
    }
    countOnline();
    notice(frame.message, 'kick', frame.ts);
  }

  function showTopic(topic) {
    ui.topic.textContent = topic;
    ui.topic.title = topic;
    ui.topic.hidden = !topic;
  }

  function onWelcome(frame) {
    clearTimeout(link.welcomeTimer);
    // Only a link that stays up resets the backoff: a server that welcomes
    // and then closes (1013, a crash loop) is not redialled at full speed.
    clearTimeout(link.stableTimer);
    link.stableTimer = setTimeout(() => { link.attempts = 0; }, STABLE_MS);
    link.why = '';
    const resumed = chat.epoch !== null;
    if (!resumed && chat.ownEpoch !== frame.epoch) chat.ownSeqs.clear();  // kept for another epoch
    chat.ownEpoch = frame.epoch;
    const sameEpoch = resumed && frame.epoch === chat.epoch;
    if (resumed && !sameEpoch) {
      notice('The room started over on the server: earlier messages are not in it any more.', 'gap');
      chat.lastSeq = 0;
      chat.ownSeqs.clear();
      for (const row of ui.messages.querySelectorAll(':scope > li[data-seq]')) {
        delete row.dataset.seq;  // numbers of the old epoch: a new message may reuse them
        row.classList.remove('early');
      }
      earlyRows.clear();
    }
    chat.epoch = typeof frame.epoch === 'string' ? frame.epoch : null;
    chat.key = typeof frame.key === 'string' ? frame.key : null;
    // On a resume, what is caught up came while we were away: new, not history.
    chat.historyUpTo = sameEpoch ? chat.lastSeq : (frame.seq || 0);
    chat.quietWho = 0;
    limits.chars = frame.max_chars || MAX_CHARS;
    limits.bytes = frame.max_size || MAX_FRAME_BYTES;
    boxChanged();
    // Remember the name asked for if we got it, or it with a suffix (alice-2):
    // not a guest name handed out because it was refused.
    const name = frame.name;
    const chosen = chat.preferred || chat.wanted;  // alice, when we came back as alice-2
    becomeNamed(name, chosen && (name === chosen || name.startsWith(`${chosen}-`)) ? chosen : null);
    chat.verified = new Set(frame.verified || []);
    setModerator(frame.mod === true);
    showTopic(frame.topic || '');
    setOnline(frame.online || [chat.name]);
    link.removed = false;
    link.removal = null;
    for (const button of ui.messages.querySelectorAll('button.rejoin')) button.remove();
    link.everOnline = true;
    link.welcomed = true;
    setState('online');
    if (resumed) notice('Reconnected.', 'info', frame.ts);
    else notice(frame.message, 'info', frame.ts);
    hint(HINT);
    visited(settings.room);
    resend();
    keep();
  }

  // Moderators get a button on each message and member (see openModeration);
  // rows shown before the welcome said so get theirs now.
  function setModerator(mod) {
    if (mod === chat.mod) return;
    chat.mod = mod;
    document.body.classList.toggle('moderator', mod);
    for (const button of ui.messages.querySelectorAll('button.mod-button')) button.remove();
    if (!mod) return;
    for (const row of ui.messages.querySelectorAll(':scope > li.msg[data-seq]')) {
      row.append(messageModButton({ id: row.dataset.sender }));
    }
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
  // it is free. Not at once: when its holder comes back with its key, the
  // server sends its leave and then at once its join, and a /nick between
  // the two would be refused (or, between two tabs, swap the names). So wait
  // a little, and only if no join or nick took the name meanwhile. Names
  // are unique regardless of case, as on the server.
  function reclaimLater(freed) {
    const preferred = chat.preferred;
    if (!preferred || chat.name === preferred || !chat.name.startsWith(`${preferred}-`)
        || freed.toLowerCase() !== preferred.toLowerCase()) return;
    clearTimeout(chat.reclaimTimer);
    chat.reclaimTimer = setTimeout(() => {
      chat.reclaimTimer = 0;
      const taken = [...chat.online].some((name) => name.toLowerCase() === preferred.toLowerCase());
      if (!taken && chat.name !== preferred) sendLine(`/nick ${preferred}`);
    }, RECLAIM_DELAY_MS);
  }

  function cancelReclaim(name) {
    if (chat.reclaimTimer && chat.preferred
        && name.toLowerCase() === chat.preferred.toLowerCase()) {
      clearTimeout(chat.reclaimTimer);
      chat.reclaimTimer = 0;
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
    // Too long for the server: refused here, in the server's words, and
    // never sent (it would come back as an error, or close the socket 1009).
    const problem = tooLong(text, entry.cid);
    if (problem) {
      refuse(entry, problem);
      return;
    }
    if (!transmit(entry)) hint('Offline: your message is kept and goes out once the connection is back.');
  }

  function characters(text) {
    let count = 0;
    for (const _ of text) count += 1;  // code points, as the server counts
    return count;
  }

  function frameBytes(text, cid) {
    return new TextEncoder().encode(JSON.stringify({ cid, line: text })).length;
  }

  function tooLong(text, cid = newCid()) {
    const count = characters(text);
    if (count > limits.chars) {
      return `message too long (${count} characters; the limit is ${limits.chars}); it was not sent`;
    }
    const bytes = frameBytes(text, cid);
    if (bytes > limits.bytes) {
      return `message too big (${bytes} bytes; the limit is ${limits.bytes}); it was not sent`;
    }
    return null;
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
  // row, now marked ours; else the row waits, marked `early`, for its echo
  // to take its place.
  function onAck(frame) {
    const entry = entryOf(frame.cid);
    if (!entry) return;  // a line the page sent for itself (/who), or answered already
    forget(entry);
    if (!Number.isInteger(frame.seq)) {
      unshow(entry.row);
      return;
    }
    chat.ownSeqs.add(frame.seq);
    keep();
    const message = {
      ...draft(entry.text), id: chat.name, seq: frame.seq, ts: frame.ts,
      verified: chat.verified.has(chat.name),  // as the welcome said of us
    };
    const echo = rowOf(frame.seq);
    if (echo) {
      unshow(entry.row);
      if (!echo.classList.contains('own')) {
        const row = messageRow({ ...message, id: echo.dataset.sender,
          verified: echo.dataset.verified === '1',
          ts: rowFacts.get(echo).time }, true);
        replaceRow(echo, row);
      }
      return;
    }
    const row = messageRow(message, true);
    if (frame.seq > chat.lastSeq) {
      row.classList.add('early');
      earlyRows.add(row);
    }
    replaceRow(entry.row, row);
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
    replaceRow(entry.row, row);
    entry.row = row;
    say(`Not sent: ${reason}`);
    keep();
  }

  function editRefused(entry) {  // back in the box; a new cid when sent again
    forget(entry);
    unshow(entry.row);
    ui.input.value = entry.text;
    boxChanged();
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
      epoch: chat.epoch,
      own: [...chat.ownSeqs].slice(-OWN_SEQS_KEPT),
      lines: outbox.map(({ cid, text, typedAt, sentAt, refused }) => ({
        cid, text, typedAt, sentAt, refused,
      })),
    });
  }

  // What this tab had kept for this room before it was reloaded: its key,
  // its own lines' seqs (valid in that epoch only: see onWelcome), and the
  // lines not yet answered.
  function restore(kept) {
    if (typeof kept.key === 'string') chat.key = kept.key;
    if (typeof kept.epoch === 'string' && Array.isArray(kept.own)) {
      chat.ownSeqs = new Set(kept.own.filter(isSeq));
      chat.ownEpoch = kept.epoch;
    }
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
      // The sign-in token goes in the socket URL only, never in what is shown.
      socket = new WebSocket(socketUrl(settings.server, settings.room,
        { ...params, key: chat.key, acks: '1', token: chat.token }));
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
      if (socket === link.socket) dropped(event.code, event.reason);
    });
  }

  // Why the server closed, in words: its close code and reason.
  function closeWords(code, reason) {
    const known = CLOSES[code];
    if (!known) return '';
    if (code === 1008) return `${known.text}: ${POLICY_REASONS[reason] || reason || 'a policy was broken'}`;
    return reason && code !== CLOSE_REPLACED ? `${known.text} (${reason})` : known.text;
  }

  // `retry`: how to come back (scheduleRetry: after the backoff; connect: now).
  function dropped(code, reason = '', retry = scheduleRetry) {
    clearTimeout(link.welcomeTimer);
    clearTimeout(link.stableTimer);
    clearTimeout(link.ackTimer);
    link.ackTimer = 0;
    const inFlight = [...link.awaiting];
    link.awaiting.clear();  // the lines in it are still in the outbox: resent after the welcome
    link.welcomed = false;
    const wasOnline = ui.status.dataset.state === 'online';
    link.socket = null;
    clearTimeout(chat.whoTimer);
    chat.whoTimer = 0;
    if (code === CLOSE_KICKED || link.removed) {
      removed(code === CLOSE_KICKED ? reason : null);
      return;
    }
    const why = closeWords(code, reason);
    if (CLOSES[code] && !CLOSES[code].retry) {  // coming back would not help
      fatal(code === CLOSE_REPLACED
        ? `${why}; reload the page to chat here.`
        : `${why}. Reload the page to come back.`);
      return;
    }
    if (code === CLOSE_TOO_BIG) {
      // The first line not answered is the one the server could not take:
      // sending it again would only close the socket again.
      const entry = inFlight.map(entryOf).find(Boolean);
      if (entry) refuse(entry, 'too big for the server; it was not sent');
    }
    link.why = why;
    if (why) notice(`${why}. Reconnecting…`, 'error');
    else if (wasOnline) notice('Disconnected from the server. Reconnecting…', 'error');
    retry();
  }

  // A moderator removed us (close 4001, reason "removed by MOD: REASON"), or
  // a rejoin after that failed (`reason` null): a ban's refusal is an HTTP
  // 403 that a browser does not show a page. Say so plainly, with who, why
  // and, when the server's kick notice told us, until when; never come back
  // by ourselves (a ban would make that a loop of refusals): a Rejoin button
  // does, once the ban is over if we know when.
  const REMOVED_BY = /^removed by (\S+?)(?:: ([^]*))?$/;

  function removed(reason) {
    clearTimeout(link.retryTimer);
    link.retryTimer = 0;
    const rejoining = link.removed;
    link.removed = true;
    const room = `#${settings.room}`;
    const kick = link.removal;
    const said = reason === null ? null : REMOVED_BY.exec(reason);
    const by = kick && kick.by ? kick.by : said && said[1];
    const why = kick ? kick.reason : said && said[2];
    const banned = !!(kick && kick.ban);
    const until = banned && Number.isFinite(kick.until) ? kick.until : null;
    let message;
    if (rejoining) {
      message = banned && until !== null && until > Date.now()
        ? `Could not rejoin ${room}: you are banned until ${FORMAT.full.format(new Date(until))}.`
        : `Could not rejoin ${room}: the server refused. You may still be banned, or the server may be down.`;
    } else if (!by) {  // a server that says it otherwise
      message = `${closeWords(CLOSE_KICKED, reason || '')}. Reload the page to come back.`;
    } else {
      const verb = banned ? 'banned from' : 'removed from';
      const time = !banned ? ''
        : until === null ? ' for good' : ` until ${FORMAT.full.format(new Date(until))}`;
      message = `You were ${verb} ${room} by ${by}${time}${why ? `: ${why}` : ''}.`;
      if (!kick) message += ' If it was a ban, you cannot rejoin until it is over.';
    }
    setState('offline', banned ? 'Banned from this room' : 'Removed from this room');
    const row = noticeRow(message, 'removed');
    row.classList.add('notice-error');
    row.append(rejoinButton(banned, until));
    show(row, { announce: message });
  }

  // Rejoin: at once, or, for a ban that ends at a known time, from then on.
  // A ban for good (or of unknown length) may still be in force: the button
  // says so and tries once.
  function rejoinButton(banned, until) {
    const button = el('button', 'link-button rejoin', 'Rejoin');
    button.type = 'button';
    button.addEventListener('click', () => {
      button.remove();
      link.attempts = 0;
      connect();
    });
    const wait = until === null ? 0 : until - Date.now();
    if (banned && until === null) {
      button.textContent = 'Try to rejoin (the ban may still be in force)';
    } else if (wait > 0) {
      button.disabled = true;
      button.textContent = `Rejoin (possible from ${FORMAT.time.format(new Date(until))})`;
      const open = () => {
        const left = until - Date.now();
        if (left > 0) {
          setTimeout(open, Math.min(left, TIMER_MAX_MS));
          return;
        }
        button.disabled = false;
        button.textContent = 'Rejoin';
      };
      setTimeout(open, Math.min(wait, TIMER_MAX_MS));
    }
    return button;
  }

  // A socket that looks open but answers nothing is dead (the laptop slept,
  // the Wi-Fi changed): drop it now, without waiting for a closing handshake
  // that may never come, and forget it, so that nothing it still says counts.
  function abandon(retry) {
    const socket = link.socket;
    if (!socket) return;
    link.socket = null;
    socket.close();
    dropped(null, '', retry);
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
    const seconds = Math.ceil(delay / 1000);
    // A server refuses an expired token with an HTTP 401 that the page
    // cannot see apart from a server that is down: after a few tries, say
    // what may be wrong, and what to do.
    const signIn = chat.token && link.attempts >= SIGN_IN_HINT_AFTER
      ? '. If your sign-in has expired, open the chat again from the site that sent you here' : '';
    setState('offline', link.everOnline
      ? `${link.why ? `${link.why}. ` : ''}Reconnecting in ${seconds} s${signIn}`
      : `Cannot reach ${link.url || settings.server}; trying again in ${seconds} s${signIn}`);
  }

  function retryNow() {
    if (link.retryTimer) {
      link.attempts = 0;
      connect();
    }
  }

  function fatal(message) {
    clearTimeout(link.retryTimer);
    link.retryTimer = 0;
    setState('offline', message);
    ui.retry.hidden = true;
    notice(message, 'error');
  }

  const STATE_TEXT = {
    connecting: 'Connecting…', online: 'Online', reconnecting: 'Reconnecting…', offline: 'Offline',
  };

  // The state word is a live region and changes only with the state; the
  // detail (why, the countdown) is read only when asked for.
  function setState(state, detail = '') {
    ui.status.dataset.state = state;
    if (ui.statusText.textContent !== STATE_TEXT[state]) ui.statusText.textContent = STATE_TEXT[state];
    ui.statusDetail.textContent = detail;
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
    askToNotify();  // a user gesture: the one moment a browser lets a page ask
    chat.lastSent = text;
    ui.input.value = '';
    boxChanged();
    hint(HINT);
    queue(text);
  }

  function hint(text) {
    if (ui.hint.textContent !== text) ui.hint.textContent = text;
    ui.hint.classList.toggle('warning', text !== HINT);
  }

  // Whenever the box changes: its draft is kept for this room, the counter
  // shows near the limit, and the box grows with its text where CSS cannot
  // (field-sizing is Chromium's only).
  const GROWS_BY_CSS = typeof CSS !== 'undefined' && CSS.supports('field-sizing', 'content');

  function boxChanged() {
    const text = ui.input.value;
    if (text) store.set(draftKey(), text);
    else store.remove(draftKey());
    const count = characters(text);
    const over = count > limits.chars;
    ui.counter.hidden = count < limits.chars * COUNTER_FROM;
    ui.counter.textContent = over
      ? `${count.toLocaleString()} / ${limits.chars.toLocaleString()}: ${(count - limits.chars).toLocaleString()} too many`
      : `${count.toLocaleString()} / ${limits.chars.toLocaleString()}`;
    ui.counter.classList.toggle('over', over);
    if (!GROWS_BY_CSS) {
      ui.input.style.height = 'auto';
      ui.input.style.height = `${ui.input.scrollHeight + 2}px`;
    }
  }

  function draftKey() {
    return `${DRAFT_KEY} ${settings.server} ${settings.room}`;
  }

  ui.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });

  ui.input.addEventListener('input', () => {
    completion.state = null;
    boxChanged();
  });

  ui.input.addEventListener('keydown', (event) => {
    // Safari says isComposing is false on the Enter that ends Chinese or
    // Japanese input; its keyCode is 229 there, as while composing anywhere.
    const composing = event.isComposing || event.keyCode === 229;
    if (event.key === 'Enter' && !event.shiftKey && !composing) {
      event.preventDefault();
      submit();
    } else if (event.key === 'ArrowUp' && !ui.input.value && chat.lastSent) {
      event.preventDefault();  // bring back the last line sent, to fix or resend it
      ui.input.value = chat.lastSent;
      boxChanged();
    } else if (event.key === 'Tab' && !event.shiftKey && !event.ctrlKey && !event.altKey
               && !event.metaKey && !composing && complete()) {
      event.preventDefault();
    } else if (event.key !== 'Tab' && event.key !== 'Shift') {
      completion.state = null;
    }
  });

  // Tab completes the name being typed from who is online and who spoke;
  // Tab again offers the next one. Nothing to complete: Tab moves on as usual.
  const completion = { state: null };

  function complete() {
    const box = ui.input;
    if (box.selectionStart !== box.selectionEnd) return false;
    let state = completion.state;
    if (!state || box.value !== state.value || box.selectionStart !== state.caret) {
      const before = box.value.slice(0, box.selectionStart);
      const word = /(@?)([^\s@]*)$/.exec(before);
      if (!word[2]) return false;
      const prefix = word[2].toLowerCase();
      const names = [...new Set([...chat.online, ...chat.senders])]
        .filter((name) => name.toLowerCase().startsWith(prefix) && name !== chat.name)
        .sort(collator.compare);
      if (!names.length) return false;
      const start = before.length - word[2].length;
      state = { names, index: -1, start, at: !!word[1], after: box.value.slice(box.selectionStart) };
    }
    state.index = (state.index + 1) % state.names.length;
    const atStart = state.start === 0 && !state.at;
    const inserted = state.names[state.index] + (atStart ? ': ' : ' ');
    box.value = box.value.slice(0, state.start) + inserted + state.after;
    const caret = state.start + inserted.length;
    box.setSelectionRange(caret, caret);
    state.value = box.value;
    state.caret = caret;
    completion.state = state;
    boxChanged();
    return true;
  }

  // Clicking a sender's name puts @name in the box (the keyboard's way is Tab).
  function mention(name) {
    const box = ui.input;
    const before = box.value.slice(0, box.selectionStart);
    const after = box.value.slice(box.selectionEnd);
    const text = `${before && !/\s$/.test(before) ? ' ' : ''}@${name} `;
    box.value = before + text + after;
    const caret = before.length + text.length;
    box.focus();
    box.setSelectionRange(caret, caret);
    boxChanged();
  }

  // A time's tooltip (the full date and time) is made when first pointed
  // at, not for each of a thousand rows up front.
  ui.messages.addEventListener('mouseover', (event) => {
    const time = event.target.closest('time');
    if (time && !time.title) time.title = FORMAT.full.format(new Date(time.dateTime));
  });

  ui.messages.addEventListener('click', (event) => {
    const sender = event.target.closest('#messages > li.msg .sender');
    if (sender) mention(sender.textContent);
    const button = event.target.closest('#messages > li.msg button.mod-button');
    if (button) {
      const row = button.closest('li');
      const text = row.querySelector('.action-text') || row.querySelector('.text');
      openModeration({
        name: row.dataset.sender, seq: Number(row.dataset.seq), text: text.textContent,
      }, button);
    }
  });

  ui.online.addEventListener('click', (event) => {
    const button = event.target.closest('button.mod-button');
    if (button) openModeration({ name: button.closest('li').dataset.name, seq: 0, text: '' }, button);
  });

  // Moderating: kick, ban (for how long, and why) or delete, from a
  // message's or a member's button, in a small dialog. What it does goes
  // out as the commands a moderator could type (/kick, /ban, /delete),
  // through the outbox like any line: answered, resent after a drop.
  const moderation = { target: null, opener: null };

  function openModeration(target, opener) {
    moderation.target = target;
    moderation.opener = opener;
    const member = target.name !== chat.name;  // nobody removes themselves
    ui.modName.textContent = target.text ? `the message from ${target.name}` : target.name;
    ui.modQuote.textContent = target.text;
    ui.modQuote.hidden = !target.text;
    ui.modDelete.hidden = !target.seq;
    for (const node of [ui.modMember, ui.modKick, ui.modBan]) node.hidden = !member;
    ui.modKick.textContent = `Kick ${target.name}`;
    ui.modBan.textContent = `Ban ${target.name}`;
    ui.modReason.value = '';
    ui.modDuration.value = '1d';
    ui.modDialog.showModal();
    (member ? ui.modReason : ui.modDelete).focus();
  }

  function moderate(command) {
    ui.modDialog.close();
    queue(command);
  }

  function modReason() {
    const reason = ui.modReason.value.replace(/\s+/g, ' ').trim();
    return reason ? ` ${reason}` : '';
  }

  ui.modDelete.addEventListener('click', () => moderate(`/delete ${moderation.target.seq}`));
  ui.modKick.addEventListener('click', () => moderate(`/kick ${moderation.target.name}${modReason()}`));
  ui.modBan.addEventListener('click', () => moderate(
    `/ban ${moderation.target.name} ${ui.modDuration.value}${modReason()}`));
  ui.modCancel.addEventListener('click', () => ui.modDialog.close());
  $('mod-form').addEventListener('submit', (event) => event.preventDefault());  // Enter: no choice made
  ui.modDialog.addEventListener('close', () => {
    const back = moderation.opener;
    moderation.opener = null;
    if (back && back.isConnected) back.focus();
    else ui.input.focus();
  });

  // Changing one's name: a small dialog that sends /nick.

  ui.me.addEventListener('click', () => {
    if (chat.name && chat.verified.has(chat.name)) {
      notice('Your name comes from your sign-in; it cannot be changed here.');
      return;
    }
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

  // Settings: kept in this browser.

  function savePrefs() {
    store.set(SETTINGS_KEY, JSON.stringify(prefs));
  }

  function applyPrefs() {
    ui.showPresence.checked = prefs.showPresence;
    ui.notify.checked = prefs.notify;
    document.body.classList.toggle('hide-presence', !prefs.showPresence);
    settle();
  }

  ui.showPresence.addEventListener('change', () => {
    prefs.showPresence = ui.showPresence.checked;
    savePrefs();
    applyPrefs();
  });

  ui.notify.addEventListener('change', () => {
    prefs.notify = ui.notify.checked;
    savePrefs();
    askToNotify();  // a click: a user gesture
  });

  // Rooms: the ones visited on this server (localStorage), and a field to
  // open another. Switching needs no reload: the socket goes to the new
  // room, and each room keeps its draft and its unsent lines.

  function roomsKey() {
    return `${ROOMS_KEY} ${settings.server}`;
  }

  function visitedRooms() {
    const rooms = store.json(roomsKey());
    return Array.isArray(rooms) ? rooms.filter((room) => isText(room) && validRoom(room)) : [];
  }

  function visited(room) {
    const rooms = [room, ...visitedRooms().filter((other) => other !== room)].slice(0, ROOMS_KEPT);
    store.set(roomsKey(), JSON.stringify(rooms));
    renderRooms();
  }

  function renderRooms() {
    const rooms = visitedRooms();
    if (!rooms.includes(settings.room)) rooms.unshift(settings.room);
    ui.rooms.replaceChildren(...rooms.map((room) => {
      const item = el('li');
      const button = el('button', 'room-button', `#${room}`);
      button.type = 'button';
      button.dataset.room = room;
      if (room === settings.room) button.setAttribute('aria-current', 'page');
      item.append(button);
      return item;
    }));
  }

  ui.rooms.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-room]');
    if (button) switchRoom(button.dataset.room);
  });

  ui.roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const room = ui.roomInput.value.trim().replace(/^#/, '');
    if (!validRoom(room)) {
      ui.roomError.textContent = 'A room name has 1 to 64 letters A-Z a-z, digits, _ . -';
      return;
    }
    ui.roomError.textContent = '';
    ui.roomInput.value = '';
    switchRoom(room);
  });

  function switchRoom(room) {
    if (room === settings.room) {
      ui.menu.open = false;
      return;
    }
    leaveRoom();
    settings.room = room;
    try {
      const url = new URL(location.href);
      url.searchParams.set('room', room);
      history.replaceState(null, '', url.href);
    } catch { /* from file:// some browsers refuse: the room is still switched */ }
    ui.menu.open = false;
    enterRoom();
    ui.input.focus();
  }

  // Forget everything of this room but what is kept for it (its draft, and
  // in this tab its key and unsent lines), and close its socket quietly.
  function leaveRoom() {
    keep();
    const socket = link.socket;
    link.socket = null;
    if (socket) socket.close(1000, 'switched rooms');
    for (const timer of [link.welcomeTimer, link.retryTimer, link.ackTimer, link.stableTimer,
      chat.whoTimer, chat.reclaimTimer]) clearTimeout(timer);
    Object.assign(link, {
      retryTimer: 0, ackTimer: 0, attempts: 0, deadLinks: 0, welcomed: false, why: '',
      removed: false, removal: null,
    });
    link.awaiting.clear();
    Object.assign(chat, {
      key: null, epoch: null, lastSeq: 0, ownSeqs: new Set(), ownEpoch: null, historyUpTo: 0, quietWho: 0,
      whoTimer: 0, reclaimTimer: 0, unread: 0, mentions: 0, markNext: false,
      senders: new Set(), count: 0, verified: new Set(),
    });
    showTopic('');
    chat.wanted = chat.preferred || chat.name || chat.wanted;
    outbox.length = 0;
    earlyRows.clear();
    setOnline([]);
    ui.messages.replaceChildren();
    nearRows.length = 0;
    view.atBottom = true;
  }

  function enterRoom() {
    const kept = keptTab.load(settings.server, settings.room);
    ui.roomName.textContent = settings.room;
    ui.input.placeholder = `Message #${settings.room}`;
    ui.input.value = store.get(draftKey()) || '';
    boxChanged();
    updateTitle();
    renderRooms();
    restore(kept);
    connect();
  }

  // Scrolling, titles, network hints

  // The reader scrolled, or the browser did (rows went): are we at the end?
  // Not when the scroll is the page's own to the end (scrollToEnd): its
  // event comes a frame later, when more rows of a long history may have
  // come meanwhile, and the view would stop following them half-way.
  ui.messages.addEventListener('scroll', () => {
    const list = ui.messages;
    if (list.scrollTop === view.endTop) return;
    view.endTop = -1;
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

  // The title: "(5) #room · Chat" for five lines while away, "(5) @2 ..."
  // when two of them mention you.
  function updateTitle() {
    const base = `#${settings.room} · Chat`;
    const mentions = chat.mentions ? `@${chat.mentions} ` : '';
    document.title = chat.unread ? `(${chat.unread}) ${mentions}${base}` : base;
  }

  document.addEventListener('visibilitychange', () => {
    resettle();
    if (document.hidden) {
      // The next line that comes while away gets the "new since you left"
      // marker above it, replacing the last one.
      chat.markNext = true;
      return;
    }
    chat.markNext = false;
    chat.unread = 0;
    chat.mentions = 0;
    updateTitle();
    relabel();
    retryNow();  // back to the tab: no need to wait out the backoff
  });

  window.addEventListener('online', retryNow);

  // Start: a ?server= for another host than the page's own server waits for
  // the user's yes, in the page.

  function askForServer(then) {
    const asked = hostOf(settings.asked) || settings.asked;
    const own = hostOf(settings.server) || settings.server;
    ui.serverAsked.textContent = asked;
    ui.serverGoHost.textContent = asked;
    ui.serverOwn.textContent = own;
    ui.serverStayHost.textContent = own;
    let chosen = false;
    const choose = (server) => {
      if (chosen) return;
      chosen = true;
      settings.server = server;
      ui.serverPrompt.close();
      then();
    };
    ui.serverGo.addEventListener('click', () => choose(settings.asked));
    ui.serverStay.addEventListener('click', () => choose(settings.server));
    // Escape, or a browser that closes the dialog by itself: stay.
    ui.serverPrompt.addEventListener('cancel', (event) => event.preventDefault());
    ui.serverPrompt.addEventListener('close', () => choose(settings.server));
    setState('connecting', `Waiting for your choice of server`);
    ui.serverPrompt.showModal();
    ui.serverStay.focus();
  }

  function start() {
    takeToken();
    ui.roomName.textContent = settings.room;
    ui.input.placeholder = `Message #${settings.room}`;
    applyPrefs();
    relabel();
    updateTitle();
    if (!validRoom(settings.room)) {
      fatal(`“${settings.room}” is not a room name: use 1 to 64 letters A-Z a-z, digits, _ . -`);
      return;
    }
    if (settings.asked) {
      ui.me.textContent = 'guest';
      askForServer(begin);
      return;
    }
    begin();
  }

  // The server is settled (the user may have been asked): a token from the
  // link is for it, kept in this tab; else the one this tab kept for it.
  function begin() {
    if (settings.token) tabToken.set(settings.server, settings.token);
    chat.token = settings.token || tabToken.get(settings.server);
    settings.token = null;
    const kept = keptTab.load(settings.server, settings.room);
    chat.wanted = (typeof kept.name === 'string' && kept.name)
      || settings.queryName || savedName.get() || null;
    ui.me.textContent = chat.wanted || 'guest';
    enterRoom();
  }

  start();
})();
