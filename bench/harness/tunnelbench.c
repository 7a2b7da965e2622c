/* New CONNECT tunnels per second through an HTTP proxy on 127.0.0.1.
 *
 *   tunnelbench PROXY_PORT ORIGIN_HOST ORIGIN_PORT CONNS SECONDS [PATH]
 *
 * CONNS connections at once, each in a loop until SECONDS have passed: connect to the proxy,
 * send CONNECT ORIGIN_HOST:ORIGIN_PORT, wait for the proxy's "200", send
 * "GET PATH" with "Connection: close" through the tunnel, read until the origin closes, close.
 * One iteration = one tunnel set up, used once and torn down. It waits for the 200 before
 * sending anything through the tunnel, as curl does (proxy.py drops bytes sent before its 200).
 *
 * Prints one JSON line: {"tunnels", "errors", "refused", "seconds", "p50_us", "p99_us", "max_us"}.
 * Only loopback: the proxy address is fixed to 127.0.0.1. Bounded: stops after SECONDS (+2 s
 * grace for tunnels in flight, which are then abandoned and not counted), 10 s per tunnel at most.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, READ_REPLY, READ_BODY };

typedef struct {
    int fd;
    int state;
    double started;
    size_t got;
    size_t body;
    char head[1024];
} conn_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in proxy_addr;
static char connect_req[512], get_req[512];
static size_t connect_len, get_len;
static int epfd;
static uint32_t *lat = NULL;
static size_t nlat = 0, caplat = 0;
static long errors = 0, refused = 0;

static void start(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    c->state = CONNECTING;
    c->got = 0;
    c->body = 0;
    c->started = now();
    if (c->fd < 0) {
        errors++;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&proxy_addr, sizeof proxy_addr) < 0 && errno != EINPROGRESS) {
        errors++;
        close(c->fd);
        c->fd = -1;
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void finish(conn_t *c, int ok) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    if (ok) {
        if (nlat == caplat) {
            caplat = caplat ? caplat * 2 : 65536;
            lat = realloc(lat, caplat * sizeof *lat);
            if (!lat) {
                fprintf(stderr, "out of memory\n");
                exit(2);
            }
        }
        double us = (now() - c->started) * 1e6;
        lat[nlat++] = us > 4e9 ? 4000000000u : (uint32_t)us;
    } else {
        errors++;
    }
}

static void on_event(conn_t *c) {
    char buf[65536];
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            finish(c, 0);
            return;
        }
        if (write(c->fd, connect_req, connect_len) != (ssize_t)connect_len) {
            finish(c, 0);
            return;
        }
        c->state = READ_REPLY;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        return;
    }
    for (;;) {
        ssize_t n = read(c->fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            finish(c, 0);
            return;
        }
        if (c->state == READ_REPLY) {
            if (n == 0) {
                finish(c, 0);
                return;
            }
            size_t room = sizeof c->head - 1 - c->got;
            size_t k = (size_t)n < room ? (size_t)n : room;
            memcpy(c->head + c->got, buf, k);
            c->got += k;
            c->head[c->got] = 0;
            char *end = strstr(c->head, "\r\n\r\n");
            if (!end) {
                if (c->got >= sizeof c->head - 1) finish(c, 0);
                continue;
            }
            /* "HTTP/1.x 200 ..." */
            if (strncmp(c->head, "HTTP/1.", 7) != 0 || strncmp(c->head + 8, " 200", 4) != 0) {
                refused++;
                finish(c, 0);
                return;
            }
            size_t extra = c->got - (size_t)(end + 4 - c->head);
            c->body = extra;
            if (write(c->fd, get_req, get_len) != (ssize_t)get_len) {
                finish(c, 0);
                return;
            }
            c->state = READ_BODY;
            continue;
        }
        /* READ_BODY: until the origin closes the tunnel */
        if (n == 0) {
            finish(c, c->body > 0);
            return;
        }
        c->body += (size_t)n;
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s PROXY_PORT ORIGIN_HOST ORIGIN_PORT CONNS SECONDS [PATH]\n", argv[0]);
        return 2;
    }
    int proxy_port = atoi(argv[1]);
    const char *ohost = argv[2];
    int oport = atoi(argv[3]);
    int conns = atoi(argv[4]);
    double seconds = atof(argv[5]);
    const char *path = argc > 6 ? argv[6] : "/1k";
    if (conns < 1 || conns > 10000 || seconds <= 0 || seconds > 600 || proxy_port <= 0 || oport <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    memset(&proxy_addr, 0, sizeof proxy_addr);
    proxy_addr.sin_family = AF_INET;
    proxy_addr.sin_port = htons((uint16_t)proxy_port);
    inet_pton(AF_INET, "127.0.0.1", &proxy_addr.sin_addr);
    connect_len = (size_t)snprintf(connect_req, sizeof connect_req,
                                   "CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n", ohost, oport, ohost, oport);
    get_len = (size_t)snprintf(get_req, sizeof get_req,
                               "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n", path, ohost, oport);

    epfd = epoll_create1(0);
    conn_t *cs = calloc((size_t)conns, sizeof *cs);
    double t0 = now(), deadline = t0 + seconds, hard_stop = deadline + 2.0;
    for (int i = 0; i < conns; i++) start(&cs[i]);
    struct epoll_event evs[256];
    size_t counted_at_deadline = (size_t)-1;
    double t_end = deadline;
    for (;;) {
        double t = now();
        if (t >= deadline && counted_at_deadline == (size_t)-1) counted_at_deadline = nlat;
        int live = 0;
        for (int i = 0; i < conns; i++) {
            conn_t *c = &cs[i];
            if (c->fd < 0) {
                if (t < deadline) start(c);
            } else if (t - c->started > 10.0) {
                finish(c, 0);
                if (t < deadline) start(c);
            }
            if (c->fd >= 0) live++;
        }
        if (t >= deadline && (live == 0 || t >= hard_stop)) break;
        int n = epoll_wait(epfd, evs, 256, 50);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->fd >= 0) on_event(c);
            if (c->fd < 0 && now() < deadline) start(c);
        }
    }
    for (int i = 0; i < conns; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);
    /* Tunnels finished after the deadline are not counted in the rate (their time is partly outside). */
    size_t counted = counted_at_deadline == (size_t)-1 ? nlat : counted_at_deadline;
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    uint32_t p50 = nlat ? lat[(size_t)(nlat * 0.50)] : 0, p99 = nlat ? lat[(size_t)(nlat * 0.99)] : 0;
    uint32_t mx = nlat ? lat[nlat - 1] : 0;
    printf("{\"tunnels\": %zu, \"errors\": %ld, \"refused\": %ld, \"seconds\": %.6f, \"p50_us\": %u, "
           "\"p99_us\": %u, \"max_us\": %u}\n", counted, errors, refused, t_end - t0, p50, p99, mx);
    free(cs);
    free(lat);
    return 0;
}
