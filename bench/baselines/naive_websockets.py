"""The tutorial's logic on `websockets` with the library's defaults
(permessage-deflate offered, keepalive pings, one task per connection).

Usage: python naive_websockets.py PORT
"""

import asyncio
import json
import sys

from websockets.asyncio.server import broadcast, serve

clients = set()


async def handler(websocket):
    await websocket.send(json.dumps({"type": "sys", "message": "Welcome to WebSocket"}))
    broadcast(clients, json.dumps({"type": "sys", "message": f"{id(websocket)} has joined"}))
    clients.add(websocket)
    try:
        async for message in websocket:
            broadcast(clients, json.dumps({"type": "user", "id": id(websocket),
                                           "message": message}))
    finally:
        clients.discard(websocket)
        broadcast(clients, json.dumps({"type": "sys", "message": f"{id(websocket)} has left"}))


async def main(port):
    async with serve(handler, "127.0.0.1", port):
        print(f"listening on ws://127.0.0.1:{port}/", flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
