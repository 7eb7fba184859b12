/* loadgen: the WebSocket load generator of the fan-out benchmark.
 *
 * One thread, epoll, raw sockets: it opens many client connections to one
 * chat room, makes a few of them send small messages at an open-loop rate,
 * and counts what every client receives without parsing JSON.  A sample of
 * the clients reads the send timestamp out of each message for latency.
 *
 *   loadgen fanout HOST PORT PATH CLIENTS SENDERS MSG_BYTES STEP_S DEFLATE SERVER_PID RATE...
 *   loadgen idle   HOST PORT PATH CLIENTS DEFLATE     (holds until stdin closes)
 *   loadgen storm  HOST PORT PATH CLIENTS DEFLATE
 *   loadgen ingest HOST PORT PREFIX CLIENTS ROOMS LINE_BYTES STEP_S DEFLATE SERVER_PID RATE...
 *   loadgen rooms  HOST PORT PREFIX CLIENTS ROOMS SENDERS MSG_BYTES STEP_S DEFLATE SERVER_PID RATE...
 *
 * ingest: client i joins room PREFIX<i % ROOMS> (/r0, /r1, ...) with
 * ?acks=1, and every client sends: lines go round-robin over all clients at
 * an open-loop rate (lines/s), each as {"cid": "<send ns>_<n>", "line":
 * "xxx..."}.  Every frame received is scanned (memmem, no JSON parsing) for
 * "event":"ack" (the cid gives the latency of every ack), "event":"error",
 * or else counted as a chat delivery.
 *
 * rooms: many small rooms.  Client i joins room PREFIX<i % ROOMS> (no
 * acks), SENDERS clients of each room send (clients 0 .. SENDERS*ROOMS-1),
 * lines go round-robin over them at an open-loop rate (lines/s), each
 * carrying its send time like the fan-out's.  Each line should reach every
 * member of its room, the sender too; every client reads the timestamp of
 * every frame it gets, so the latency is that of every delivery.  The
 * ladder ends after two failing steps in a row (lost frames or p99 >= 100
 * ms), not one: on a shared machine a neighbour can spoil one step.
 *
 * SERVER_PID may be PID,BROKER_PID: then the broker's CPU (redis-server,
 * which is not in the server's process tree) is counted apart, as
 * broker_cpu_s.
 *
 * Results are JSON lines on stdout.  Loopback only; every phase is bounded
 * in time.
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
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define SAMPLED 50            /* clients that read timestamps */
#define MARK "@@"             /* timestamp marker in message text */
#define MAX_LAT 4000000

typedef struct {
    int fd;
    int open;                 /* handshake done */
    int compressed;           /* server negotiated permessage-deflate */
    int sampled;
    unsigned char *buf;
    size_t len, cap;
    long messages;
    z_stream z;
    int z_ready;
} Conn;

static Conn *conns;
static int nconns, epfd;
static long total_messages;
static double *lat_ms;
static long nlat;
static const char *host, *path;
static int port;
/* ingest and rooms: clients spread over rooms PATH0..PATH<rooms-1>; the
 * ingest's with ?acks=1 */
static int rooms, with_acks;
static long acks, errors_seen, deliveries;
static void on_ingest_frame(const unsigned char *p, size_t n);

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static double self_cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static double proc_cpu_s(int pid) {
    char name[64], text[2048];
    snprintf(name, sizeof name, "/proc/%d/stat", pid);
    FILE *f = fopen(name, "r");
    if (!f) return 0;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char *p = strrchr(text, ')');
    unsigned long utime = 0, stime = 0;
    /* fields after ')': state ppid ... utime is the 12th, stime the 13th */
    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime);
    return (utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* The server's CPU: its process and every process under it (the workers of
   chatserver --workers; a process that exits during a step loses its share). */
static double tree_cpu_s(int pid) {
    double total = proc_cpu_s(pid);
    char name[64];
    snprintf(name, sizeof name, "/proc/%d/task/%d/children", pid, pid);
    FILE *f = fopen(name, "r");
    if (!f) return total;
    int child;
    while (fscanf(f, "%d", &child) == 1) total += tree_cpu_s(child);
    fclose(f);
    return total;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void send_all(int fd, const void *data, size_t len) {
    const char *p = data;
    double deadline = now_s() + 5;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n > 0) { p += n; len -= n; continue; }
        if (n < 0 && (errno == EAGAIN || errno == EINTR) && now_s() < deadline) continue;
        die("write");
    }
}

static void open_conn(int i, int deflate) {
    Conn *c = &conns[i];
    memset(c, 0, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[768], target[300];
    if (rooms > 0)
        snprintf(target, sizeof target, "%s%d%s", path, i % rooms, with_acks ? "?acks=1" : "");
    else snprintf(target, sizeof target, "%s", path);
    int n = snprintf(req, sizeof req,
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Origin: http://localhost:8000\r\n%s\r\n",
        target, host, port,
        deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "");
    send_all(c->fd, req, n);
    fcntl(c->fd, F_SETFL, O_NONBLOCK);
    c->cap = 65536;
    c->buf = malloc(c->cap);
    c->sampled = rooms > 0 || i < SAMPLED;  /* ingest and rooms read every frame */
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void send_frame(Conn *c, int opcode, const unsigned char *data, size_t len) {
    unsigned char frame[2048];
    unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    size_t h = 2;
    if (len > sizeof frame - 8) len = sizeof frame - 8;
    frame[0] = 0x80 | opcode;
    if (len < 126) frame[1] = 0x80 | len;
    else { frame[1] = 0x80 | 126; frame[2] = len >> 8; frame[3] = len & 255; h = 4; }
    memcpy(frame + h, mask, 4);
    h += 4;
    for (size_t k = 0; k < len; k++) frame[h + k] = data[k] ^ mask[k & 3];
    send_all(c->fd, frame, h + len);
}

static void note_latency(const unsigned char *p, size_t n) {
    const unsigned char *m = memmem(p, n, MARK, 2);
    if (!m || m + 2 + 19 > p + n || nlat >= MAX_LAT) return;
    long long sent = 0;
    for (int k = 0; k < 19; k++) sent = sent * 10 + (m[2 + k] - '0');
    lat_ms[nlat++] = (now_ns() - sent) / 1e6;
}

static void sample(Conn *c, const unsigned char *p, size_t n, int rsv1) {
    void (*take)(const unsigned char *, size_t) = with_acks ? on_ingest_frame : note_latency;
    if (!rsv1) { take(p, n); return; }
    static unsigned char out[262144];
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    if (!c->z_ready) {
        if (inflateInit2(&c->z, -15) != Z_OK) die("inflateInit2");
        c->z_ready = 1;
    }
    size_t got = 0;
    for (int part = 0; part < 2; part++) {
        c->z.next_in = (unsigned char *)(part ? tail : p);
        c->z.avail_in = part ? 4 : n;
        do {
            c->z.next_out = out + got;
            c->z.avail_out = sizeof out - got;
            int r = inflate(&c->z, Z_SYNC_FLUSH);
            if (r != Z_OK && r != Z_BUF_ERROR) { fprintf(stderr, "inflate failed\n"); return; }
            got = sizeof out - c->z.avail_out;
        } while (c->z.avail_in && got < sizeof out);
    }
    take(out, got);
}

/* Parse whole frames out of the buffer; count messages, answer pings. */
static void parse(Conn *c) {
    size_t i = 0;
    while (c->len - i >= 2) {
        unsigned char *f = c->buf + i;
        uint64_t n = f[1] & 127;
        size_t h = 2;
        if (n == 126) { if (c->len - i < 4) break; n = (f[2] << 8) | f[3]; h = 4; }
        else if (n == 127) {
            if (c->len - i < 10) break;
            n = 0;
            for (int k = 0; k < 8; k++) n = (n << 8) | f[2 + k];
            h = 10;
        }
        if (c->len - i < h + n) break;
        int opcode = f[0] & 15, fin = f[0] & 0x80, rsv1 = f[0] & 0x40;
        if (opcode == 9) send_frame(c, 10, f + h, n < 125 ? n : 0);
        else if (opcode <= 2 && fin) {
            c->messages++;
            total_messages++;
            if (c->sampled) sample(c, f + h, n, rsv1);
        }
        i += h + n;
    }
    memmove(c->buf, c->buf + i, c->len - i);
    c->len -= i;
}

static void on_readable(Conn *c) {
    for (;;) {
        if (c->cap - c->len < 16384) {
            c->cap *= 2;
            c->buf = realloc(c->buf, c->cap);
        }
        size_t room = c->cap - c->len;
        ssize_t n = read(c->fd, c->buf + c->len, room);
        if (n == 0) { fprintf(stderr, "server closed a connection\n"); exit(2); }
        if (n < 0) {
            if (errno == EAGAIN) return;
            die("read");
        }
        c->len += n;
        /* A short read emptied the socket: epoll (level-triggered) will say
         * when there is more, which saves a read() that would fail. */
        int drained = (size_t)n < room;
        if (!c->open) {
            unsigned char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end) continue;
            if (memcmp(c->buf, "HTTP/1.1 101", 12) != 0) {
                fprintf(stderr, "handshake refused: %.60s\n", c->buf);
                exit(2);
            }
            c->compressed = memmem(c->buf, end - c->buf, "permessage-deflate", 18) != NULL;
            c->open = 1;
            size_t used = end + 4 - c->buf;
            memmove(c->buf, c->buf + used, c->len - used);
            c->len -= used;
        }
        parse(c);
        if (drained) return;
    }
}

/* Run the event loop until `until`; if `quiet_s` > 0, stop early once no
 * message has come for that long.  Returns the time it stopped. */
static double pump(double until, double quiet_s) {
    struct epoll_event events[512];
    long seen = total_messages;
    double last = now_s();
    for (;;) {
        double t = now_s();
        if (t >= until) return t;
        if (quiet_s > 0 && t - last >= quiet_s) return t;
        int wait_ms = (int)((until - t) * 1000) + 1;
        if (wait_ms > 50) wait_ms = 50;
        int n = epoll_wait(epfd, events, 512, wait_ms);
        for (int k = 0; k < n; k++) on_readable(&conns[events[k].data.u32]);
        if (total_messages != seen) { seen = total_messages; last = now_s(); }
    }
}

static int all_open(void) {
    for (int i = 0; i < nconns; i++) if (!conns[i].open || conns[i].messages == 0) return 0;
    return 1;
}

static void connect_all(int deflate, double timeout_s) {
    for (int i = 0; i < nconns; i++) {
        open_conn(i, deflate);
        if (i % 64 == 63) pump(now_s() + 0.001, 0);
    }
    double deadline = now_s() + timeout_s;
    while (!all_open()) {
        if (now_s() > deadline) { fprintf(stderr, "clients were not all welcomed in time\n"); exit(2); }
        pump(now_s() + 0.05, 0);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) {
    if (!nlat) return -1;
    return lat_ms[(long)(q * (nlat - 1))];
}

/* SERVER_PID, or SERVER_PID,BROKER_PID (see the top). */
static int broker_pid;
static int server_pid_arg(const char *arg) {
    const char *comma = strchr(arg, ',');
    broker_pid = comma ? atoi(comma + 1) : 0;
    return atoi(arg);
}
static double broker_cpu_s(void) { return broker_pid ? proc_cpu_s(broker_pid) : 0; }

static void raise_fd_limit(void) {
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
}

static int fanout(int argc, char **argv) {
    int senders = atoi(argv[6]), msg_bytes = atoi(argv[7]), deflate = atoi(argv[9]);
    double step_s = atof(argv[8]);
    int server_pid = server_pid_arg(argv[10]);
    connect_all(deflate, 60);
    pump(now_s() + 30, 1.0);  /* let join notices settle */
    unsigned char text[128];
    if (msg_bytes < 24 || msg_bytes > 120) msg_bytes = 64;
    for (int r = 11; r < argc; r++) {
        double rate = atof(argv[r]);
        total_messages = 0;
        nlat = 0;
        double cpu0 = tree_cpu_s(server_pid), self0 = self_cpu_s(), broker0 = broker_cpu_s();
        double t0 = now_s(), end = t0 + step_s;
        long sent = 0;
        while (now_s() < end) {
            double t = now_s();
            while (t0 + sent / rate <= t && t0 + sent / rate < end) {
                int n = snprintf((char *)text, sizeof text, MARK "%019lld ", now_ns());
                memset(text + n, 'x', msg_bytes - n);
                send_frame(&conns[sent % senders], 1, text, msg_bytes);
                sent++;
            }
            double next = t0 + sent / rate;
            pump(next < end ? next : end, 0);
        }
        double stopped = pump(now_s() + 5, 0.5);  /* drain */
        double cpu1 = tree_cpu_s(server_pid), self1 = self_cpu_s(), broker1 = broker_cpu_s();
        long expected = sent * (long)nconns;
        qsort(lat_ms, nlat, sizeof *lat_ms, cmp_double);
        double p99 = pct(0.99);
        printf("{\"rate\": %.0f, \"sent\": %ld, \"expected\": %ld, \"received\": %ld, "
               "\"lost\": %ld, \"deliveries_per_s\": %.0f, \"p50_ms\": %.2f, \"p99_ms\": %.2f, "
               "\"max_ms\": %.2f, \"server_cpu_s\": %.3f, \"loadgen_cpu_s\": %.3f, "
               "\"broker_cpu_s\": %.3f, "
               "\"step_s\": %.3f, \"wall_s\": %.3f, \"compressed\": %d}\n",
               rate, sent, expected, total_messages, expected - total_messages,
               total_messages / step_s, pct(0.5), p99, pct(1.0), cpu1 - cpu0, self1 - self0, broker1 - broker0,
               step_s, stopped - t0, conns[0].compressed);
        fflush(stdout);
        if (expected != total_messages || p99 >= 100) break;
    }
    return 0;
}

/* ingest: an ack gives the latency of its line from the send time in its
 * cid ("cid":"<19 digits>_<n>"); an error is counted; anything else that
 * is a chat frame ("type":"user") is a delivery. */
#define ACK_EVENT "\"event\":\"ack\""
#define ERROR_EVENT "\"event\":\"error\""
#define CID_FIELD "\"cid\":\""
static void on_ingest_frame(const unsigned char *p, size_t n) {
    if (memmem(p, n, ACK_EVENT, sizeof ACK_EVENT - 1)) {
        acks++;
        const unsigned char *m = memmem(p, n, CID_FIELD, sizeof CID_FIELD - 1);
        if (!m) return;
        m += sizeof CID_FIELD - 1;
        if (m + 19 > p + n || nlat >= MAX_LAT) return;
        long long sent = 0;
        for (int k = 0; k < 19; k++) sent = sent * 10 + (m[k] - '0');
        lat_ms[nlat++] = (now_ns() - sent) / 1e6;
    } else if (memmem(p, n, ERROR_EVENT, sizeof ERROR_EVENT - 1)) {
        if (errors_seen++ < 3) fprintf(stderr, "error frame: %.*s\n", (int)n, p);
    } else if (memmem(p, n, "\"type\":\"user\"", 13)) {
        deliveries++;
    }
}

static int ingest(int argc, char **argv) {
    int line_bytes = atoi(argv[7]), deflate = atoi(argv[9]);
    double step_s = atof(argv[8]);
    int server_pid = server_pid_arg(argv[10]);
    if (line_bytes < 1 || line_bytes > 1000) line_bytes = 64;
    connect_all(deflate, 120);
    pump(now_s() + 30, 1.0);  /* let join notices settle */
    /* members of each room, for the deliveries to expect */
    int *members = calloc(rooms, sizeof *members);
    for (int i = 0; i < nconns; i++) members[i % rooms]++;
    char text[1200], line[1001];
    memset(line, 'x', line_bytes);
    line[line_bytes] = 0;
    long serial = 0;
    for (int r = 11; r < argc; r++) {
        double rate = atof(argv[r]);
        total_messages = acks = errors_seen = deliveries = 0;
        nlat = 0;
        long expected_deliveries = 0;
        double cpu0 = tree_cpu_s(server_pid), self0 = self_cpu_s(), broker0 = broker_cpu_s();
        double t0 = now_s(), end = t0 + step_s;
        long sent = 0;
        while (now_s() < end) {
            double t = now_s();
            while (t0 + sent / rate <= t && t0 + sent / rate < end) {
                int who = (int)(serial % nconns);
                int n = snprintf(text, sizeof text, "{\"cid\":\"%019lld_%ld\",\"line\":\"%s\"}",
                                 now_ns(), serial, line);
                send_frame(&conns[who], 1, (unsigned char *)text, n);
                expected_deliveries += members[who % rooms];
                serial++;
                sent++;
            }
            double next = t0 + sent / rate;
            pump(next < end ? next : end, 0);
        }
        double stopped = pump(now_s() + 5, 0.5);  /* drain */
        double cpu1 = tree_cpu_s(server_pid), self1 = self_cpu_s(), broker1 = broker_cpu_s();
        qsort(lat_ms, nlat, sizeof *lat_ms, cmp_double);
        double p99 = pct(0.99);
        printf("{\"rate\": %.0f, \"sent\": %ld, \"acked\": %ld, \"lost\": %ld, \"errors\": %ld, "
               "\"acks_per_s\": %.0f, \"expected_deliveries\": %ld, \"delivered\": %ld, "
               "\"lost_deliveries\": %ld, \"p50_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f, "
               "\"server_cpu_s\": %.3f, \"loadgen_cpu_s\": %.3f, \"broker_cpu_s\": %.3f, \"step_s\": %.3f, "
               "\"wall_s\": %.3f, \"compressed\": %d}\n",
               rate, sent, acks, sent - acks, errors_seen, acks / step_s, expected_deliveries,
               deliveries, expected_deliveries - deliveries, pct(0.5), p99, pct(1.0),
               cpu1 - cpu0, self1 - self0, broker1 - broker0, step_s, stopped - t0, conns[0].compressed);
        fflush(stdout);
        if (acks != sent || errors_seen || deliveries != expected_deliveries || p99 >= 100) break;
    }
    return 0;
}

/* rooms: SENDERS per room send plain lines; each should reach its room. */
static int rooms_scenario(int argc, char **argv) {
    int senders = atoi(argv[7]) * rooms, msg_bytes = atoi(argv[8]), deflate = atoi(argv[10]);
    double step_s = atof(argv[9]);
    int server_pid = server_pid_arg(argv[11]);
    if (senders < 1 || senders > nconns) { fprintf(stderr, "bad SENDERS\n"); return 2; }
    if (msg_bytes < 24 || msg_bytes > 120) msg_bytes = 64;
    connect_all(deflate, 180);
    pump(now_s() + 30, 1.0);  /* let join notices settle */
    int *members = calloc(rooms, sizeof *members);
    for (int i = 0; i < nconns; i++) members[i % rooms]++;
    unsigned char text[128];
    int failed = 0;
    for (int r = 12; r < argc; r++) {
        double rate = atof(argv[r]);
        total_messages = 0;
        nlat = 0;
        long expected = 0, sent = 0;
        double cpu0 = tree_cpu_s(server_pid), self0 = self_cpu_s(), broker0 = broker_cpu_s();
        double t0 = now_s(), end = t0 + step_s;
        while (now_s() < end) {
            double t = now_s();
            while (t0 + sent / rate <= t && t0 + sent / rate < end) {
                int who = (int)(sent % senders);
                int n = snprintf((char *)text, sizeof text, MARK "%019lld ", now_ns());
                memset(text + n, 'x', msg_bytes - n);
                send_frame(&conns[who], 1, text, msg_bytes);
                expected += members[who % rooms];
                sent++;
            }
            double next = t0 + sent / rate;
            pump(next < end ? next : end, 0);
        }
        double stopped = pump(now_s() + 5, 0.5);  /* drain */
        double cpu1 = tree_cpu_s(server_pid), self1 = self_cpu_s(), broker1 = broker_cpu_s();
        qsort(lat_ms, nlat, sizeof *lat_ms, cmp_double);
        double p99 = pct(0.99);
        printf("{\"rate\": %.0f, \"sent\": %ld, \"expected\": %ld, \"received\": %ld, "
               "\"lost\": %ld, \"deliveries_per_s\": %.0f, \"p50_ms\": %.2f, \"p99_ms\": %.2f, "
               "\"max_ms\": %.2f, \"server_cpu_s\": %.3f, \"loadgen_cpu_s\": %.3f, "
               "\"broker_cpu_s\": %.3f, "
               "\"step_s\": %.3f, \"wall_s\": %.3f, \"compressed\": %d}\n",
               rate, sent, expected, total_messages, expected - total_messages,
               total_messages / step_s, pct(0.5), p99, pct(1.0), cpu1 - cpu0, self1 - self0, broker1 - broker0,
               step_s, stopped - t0, conns[0].compressed);
        fflush(stdout);
        /* Two failing steps in a row end the ladder: on a shared machine one
         * step can fail for a neighbour's sake. */
        failed = expected != total_messages || p99 >= 100 ? failed + 1 : 0;
        if (failed == 2) break;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
        return 2;
    }
    raise_fd_limit();
    const char *mode = argv[1];
    host = argv[2];
    port = atoi(argv[3]);
    path = argv[4];
    nconns = atoi(argv[5]);
    conns = calloc(nconns, sizeof *conns);
    lat_ms = malloc(sizeof *lat_ms * MAX_LAT);
    epfd = epoll_create1(0);
    if (!strcmp(mode, "fanout") && argc >= 12) return fanout(argc, argv);
    if (!strcmp(mode, "ingest") && argc >= 12) {
        path = argv[4];
        rooms = atoi(argv[6]);
        with_acks = 1;
        if (rooms < 1) { fprintf(stderr, "ingest needs ROOMS >= 1\n"); return 2; }
        return ingest(argc, argv);
    }
    if (!strcmp(mode, "rooms") && argc >= 13) {
        rooms = atoi(argv[6]);
        if (rooms < 1) { fprintf(stderr, "rooms needs ROOMS >= 1\n"); return 2; }
        return rooms_scenario(argc, argv);
    }
    int deflate = atoi(argv[6]);
    if (!strcmp(mode, "idle")) {
        connect_all(deflate, 120);
        pump(now_s() + 30, 1.0);
        printf("{\"connected\": %d}\n", nconns);
        fflush(stdout);
        char line[16];
        fcntl(0, F_SETFL, O_NONBLOCK);
        for (double end = now_s() + 120; now_s() < end;) {  /* until stdin closes */
            ssize_t n = read(0, line, sizeof line);
            if (n == 0) break;
            pump(now_s() + 0.2, 0);
        }
        return 0;
    }
    if (!strcmp(mode, "storm")) {
        double t0 = now_s(), self0 = self_cpu_s();
        connect_all(deflate, 120);
        double welcomed = now_s();
        double quiet = pump(now_s() + 60, 1.5);
        printf("{\"clients\": %d, \"welcomed_s\": %.3f, \"settled_s\": %.3f, \"messages\": %ld, "
               "\"loadgen_cpu_s\": %.3f}\n", nconns, welcomed - t0, quiet - 1.5 - t0,
               total_messages, self_cpu_s() - self0);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
