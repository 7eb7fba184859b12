// The tutorial's logic on Node's `ws` library with its defaults, with one
// room per request path: a client that connects to /r7 hears only /r7 (the
// fan-out benchmark puts everyone on /, one room).
// Usage: node node_ws_server.js PORT
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
const wss = new WebSocketServer({ host: '127.0.0.1', port });
const rooms = new Map(); // path -> Set of clients
let next = 1;

function sendToAll(room, message) {
  const data = JSON.stringify(message);
  for (const client of room) client.send(data);
}

wss.on('connection', (ws, request) => {
  const id = next++;
  const path = request.url.split('?')[0];
  if (!rooms.has(path)) rooms.set(path, new Set());
  const room = rooms.get(path);
  ws.send(JSON.stringify({ type: 'sys', message: 'Welcome to WebSocket' }));
  room.add(ws); // as in wss.clients: the newcomer hears of its own join
  sendToAll(room, { type: 'sys', message: `${id} has joined` });
  ws.on('message', (data) => sendToAll(room, { type: 'user', id, message: data.toString() }));
  ws.on('close', () => {
    room.delete(ws);
    if (!room.size) rooms.delete(path);
    sendToAll(room, { type: 'sys', message: `${id} has left` });
  });
});
wss.on('listening', () => console.log(`listening on ws://127.0.0.1:${port}/`));
