/* floor: the least a WebSocket chat server can cost, as a benchmark baseline.
 *
 * Not a product: no limits, no validation, no TLS, loopback only.  It is the
 * kernel's own share of serving chat rooms: one epoll loop, the handshake,
 * one read per readable client, and for each text frame one write per
 * member of the sender's room (the sender too), the room being the request
 * path.  Each line goes out wrapped as {"type":"user","room":R,"message":T}
 * (T copied as it came: the benchmark's lines need no escaping), so that
 * the bytes written are about as many as a real server's.  Pings get
 * pongs; a close or EOF ends the connection.
 *
 *   gcc -O2 -o floor floor.c && ./floor PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FDS 65536
#define BUF_BYTES 65536
#define ROOM_SLOTS 65536      /* open addressing; more rooms than a bench opens */

typedef struct Room {
    char *path;
    int *fds, n, cap;
} Room;

typedef struct {
    int open;                 /* handshake done */
    Room *room;
    int slot;                 /* index in room->fds */
    unsigned char *in;
    size_t len;
    unsigned char *out;       /* what a full socket buffer did not take */
    size_t out_len;
} Conn;

static Conn conns[MAX_FDS];
static Room rooms[ROOM_SLOTS];
static int epfd;

/* SHA-1 (FIPS 180-4), for Sec-WebSocket-Accept only. */
static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    unsigned char *m = calloc(total, 1);
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) m[total - 1 - i] = bits >> (8 * i);
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = m[off + 4 * i] << 24 | m[off + 4 * i + 1] << 16 | m[off + 4 * i + 2] << 8
                   | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
            else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
            else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
            else { f = b ^ c ^ d; k = 0xCA62C1D6; }
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d; d = c; c = rol(b, 30); b = a; a = t;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }
    free(m);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = h[i] >> (24 - 8 * j);
}

static void base64(const unsigned char *in, size_t len, char *out) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0, o = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = in[i] << 16 | in[i + 1] << 8 | in[i + 2];
        out[o++] = abc[v >> 18]; out[o++] = abc[(v >> 12) & 63];
        out[o++] = abc[(v >> 6) & 63]; out[o++] = abc[v & 63];
    }
    if (i < len) {
        uint32_t v = in[i] << 16 | (i + 1 < len ? in[i + 1] << 8 : 0);
        out[o++] = abc[v >> 18]; out[o++] = abc[(v >> 12) & 63];
        out[o++] = i + 1 < len ? abc[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
}

static Room *room_for(const char *path, size_t n) {
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < n; i++) hash = (hash ^ (unsigned char)path[i]) * 16777619u;
    for (uint32_t k = hash % ROOM_SLOTS;; k = (k + 1) % ROOM_SLOTS) {
        Room *r = &rooms[k];
        if (!r->path) { r->path = strndup(path, n); return r; }
        if (strlen(r->path) == n && !memcmp(r->path, path, n)) return r;
    }
}

static void join(int fd, Room *r) {
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 16;
        r->fds = realloc(r->fds, r->cap * sizeof *r->fds);
    }
    conns[fd].room = r;
    conns[fd].slot = r->n;
    r->fds[r->n++] = fd;
}

static void drop(int fd) {
    Conn *c = &conns[fd];
    Room *r = c->room;
    if (r) {
        int last = r->fds[--r->n];
        r->fds[c->slot] = last;
        conns[last].slot = c->slot;
    }
    free(c->in);
    free(c->out);
    memset(c, 0, sizeof *c);
    close(fd);
}

/* One write; what the socket does not take waits for EPOLLOUT. */
static void send_to(int fd, const unsigned char *data, size_t len) {
    Conn *c = &conns[fd];
    if (!c->out_len) {
        ssize_t n = write(fd, data, len);
        if (n == (ssize_t)len) return;
        if (n < 0) {
            if (errno != EAGAIN) return;
            n = 0;
        }
        data += n;
        len -= n;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = fd};
        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
    }
    c->out = realloc(c->out, c->out_len + len);
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

static void flush_out(int fd) {
    Conn *c = &conns[fd];
    ssize_t n = write(fd, c->out, c->out_len);
    if (n <= 0) return;
    memmove(c->out, c->out + n, c->out_len - n);
    c->out_len -= n;
    if (!c->out_len) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
    }
}

static size_t frame_head(unsigned char *h, int opcode, size_t len) {
    h[0] = 0x80 | opcode;
    if (len < 126) { h[1] = len; return 2; }
    h[1] = 126; h[2] = len >> 8; h[3] = len & 255;
    return 4;
}

static int handshake(int fd) {
    Conn *c = &conns[fd];
    char *end = memmem(c->in, c->len, "\r\n\r\n", 4);
    if (!end) return c->len < BUF_BYTES - 1 ? 0 : -1;
    *end = 0;
    char *req = (char *)c->in;
    if (strncmp(req, "GET ", 4)) return -1;
    char *path = req + 4;
    size_t path_len = strcspn(path, "? ");
    char *key = strcasestr(req, "\r\nSec-WebSocket-Key:");
    if (!key) return -1;
    key += 20;
    while (*key == ' ') key++;
    char buf[128];
    size_t key_len = strcspn(key, "\r ");
    if (key_len > 60) return -1;
    snprintf(buf, sizeof buf, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", (int)key_len, key);
    unsigned char digest[20];
    char accept[32], answer[256];
    sha1((unsigned char *)buf, strlen(buf), digest);
    base64(digest, 20, accept);
    int n = snprintf(answer, sizeof answer, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: "
                     "websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     accept);
    static const char welcome[] = "{\"type\":\"sys\",\"message\":\"welcome\"}";
    n += frame_head((unsigned char *)answer + n, 1, sizeof welcome - 1);
    memcpy(answer + n, welcome, sizeof welcome - 1);
    send_to(fd, (unsigned char *)answer, n + sizeof welcome - 1);
    join(fd, room_for(path, path_len));
    size_t used = end + 4 - (char *)c->in;
    memmove(c->in, c->in + used, c->len - used);
    c->len -= used;
    c->open = 1;
    return 1;
}

/* Frames from a client: masked; text goes to the room, ping gets a pong. */
static int frames(int fd) {
    Conn *c = &conns[fd];
    size_t i = 0;
    static unsigned char out[BUF_BYTES + 256];
    while (c->len - i >= 6) {
        unsigned char *f = c->in + i;
        size_t n = f[1] & 127, h = 2;
        if (n == 126) { if (c->len - i < 8) break; n = f[2] << 8 | f[3]; h = 4; }
        else if (n == 127) return -1;  /* no line is that long */
        if (c->len - i < h + 4 + n) break;
        unsigned char *mask = f + h, *p = f + h + 4;
        for (size_t k = 0; k < n; k++) p[k] ^= mask[k & 3];
        int opcode = f[0] & 15;
        if (opcode == 8) return -1;
        if (opcode == 9) {
            size_t o = frame_head(out, 10, n);
            memcpy(out + o, p, n);
            send_to(fd, out, o + n);
        } else if (opcode == 1) {
            Room *r = c->room;
            char head[200];
            int hl = snprintf(head, sizeof head, "{\"type\":\"user\",\"room\":\"%.64s\","
                              "\"message\":\"", r->path + 1);
            size_t body = hl + n + 2, o = frame_head(out, 1, body);
            memcpy(out + o, head, hl);
            memcpy(out + o + hl, p, n);
            memcpy(out + o + hl + n, "\"}", 2);
            for (int m = 0; m < r->n; m++) send_to(r->fds[m], out, o + body);
        }
        i += h + 4 + n;
    }
    memmove(c->in, c->in + i, c->len - i);
    c->len -= i;
    return 0;
}

static void readable(int fd) {
    Conn *c = &conns[fd];
    ssize_t n = read(fd, c->in + c->len, BUF_BYTES - c->len);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN) return;
        drop(fd);
        return;
    }
    c->len += n;
    if (!c->open) {
        int done = handshake(fd);
        if (done < 0) { drop(fd); return; }
        if (!done) return;
    }
    if (frames(fd) < 0 || c->len == BUF_BYTES) drop(fd);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: floor PORT\n"); return 2; }
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) {
        perror("listen");
        return 1;
    }
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, events[512];
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int n = epoll_wait(epfd, events, 512, -1);
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd == lfd) {
                int cfd;
                while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (cfd >= MAX_FDS) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conns[cfd].in = malloc(BUF_BYTES);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            if (!conns[fd].in) continue;  /* dropped earlier in this batch */
            if (events[k].events & EPOLLOUT) flush_out(fd);
            if (events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(fd);
        }
    }
}
