// The tutorial's logic on Node's `ws` library with its defaults.
// Usage: node node_ws_server.js PORT
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
const wss = new WebSocketServer({ host: '127.0.0.1', port });
let next = 1;

function sendToAll(message) {
  const data = JSON.stringify(message);
  for (const client of wss.clients) client.send(data);
}

wss.on('connection', (ws) => {
  const id = next++;
  ws.send(JSON.stringify({ type: 'sys', message: 'Welcome to WebSocket' }));
  sendToAll({ type: 'sys', message: `${id} has joined` });
  ws.on('message', (data) => sendToAll({ type: 'user', id, message: data.toString() }));
  ws.on('close', () => sendToAll({ type: 'sys', message: `${id} has left` }));
});
wss.on('listening', () => console.log(`listening on ws://127.0.0.1:${port}/`));
