"""The tutorial's Tornado chat server, as written there (minus the page).

Usage: python tutorial_tornado.py PORT   (socket at ws://127.0.0.1:PORT/soc)
"""

import json
import sys

import tornado.ioloop
import tornado.web
import tornado.websocket


class SocketHandler(tornado.websocket.WebSocketHandler):
    clients = set()

    def check_origin(self, origin):  # the tutorial's page was same-origin
        return True

    @staticmethod
    def send_to_all(message):
        for c in SocketHandler.clients:
            c.write_message(json.dumps(message))

    def open(self):
        self.write_message(json.dumps({
            'type': 'sys',
            'message': 'Welcome to WebSocket',
        }))
        SocketHandler.send_to_all({
            'type': 'sys',
            'message': str(id(self)) + ' has joined',
        })
        SocketHandler.clients.add(self)

    def on_close(self):
        SocketHandler.clients.remove(self)
        SocketHandler.send_to_all({
            'type': 'sys',
            'message': str(id(self)) + ' has left',
        })

    def on_message(self, message):
        SocketHandler.send_to_all({
            'type': 'user',
            'id': id(self),
            'message': message,
        })


if __name__ == '__main__':
    app = tornado.web.Application([
        ('/soc', SocketHandler),
    ])
    app.listen(int(sys.argv[1]), address='127.0.0.1')
    print(f"listening on ws://127.0.0.1:{sys.argv[1]}/soc", flush=True)
    tornado.ioloop.IOLoop.current().start()
