/*
 * An AMQP 1.0 application on Qpid Proton-C (the proactor API), for the bridge benchmarks.
 *
 *   amqp-proton receive HOST:PORT USER PASSWORD ADDRESS TOTAL [WINDOW [EVERY]]
 *     authenticates with SASL PLAIN (ANONYMOUS when USER is "-"), attaches a receiver to
 *     ADDRESS, decodes every message, accepts the unsettled ones, and stops after TOTAL (0:
 *     never); prints one JSON line: messages, seconds from the first delivery to the last,
 *     and how many arrived pre-settled. With EVERY, it also prints a progress line
 *     {"received":N,"presettled":P,"at":T} at the first delivery and every EVERY deliveries
 *     and every 20 ms when more arrived (T: CLOCK_MONOTONIC seconds of the latest delivery,
 *     the same clock in every process), for competing receivers whose shares are not known in
 *     advance.
 *   amqp-proton serve HOST:PORT TOTAL settled|unsettled [SIZE]
 *     listens; to the first receiver that attaches it sends TOTAL messages (SIZE bytes of
 *     body, a Hono-like set of properties) as fast as the credit allows, and exits when the
 *     last one is settled. Paired with `receive`, it measures the client alone.
 *
 * The Rust load generator's fe2o3-amqp client was the bound of earlier bridge runs; Proton's C
 * core is what Qpid's and Hono's own C++/Python clients sit on.
 */
#include <proton/condition.h>
#include <proton/connection.h>
#include <proton/delivery.h>
#include <proton/link.h>
#include <proton/listener.h>
#include <proton/message.h>
#include <proton/proactor.h>
#include <proton/sasl.h>
#include <proton/session.h>
#include <proton/transport.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_secs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct app {
    pn_proactor_t *proactor;
    int serving;
    const char *address;
    long total;
    long window;
    long every, reported;
    /* receive */
    long received, presettled;
    double first, last;
    pn_message_t *message;
    char *buffer;
    size_t buffer_size;
    /* serve */
    char *encoded;
    size_t encoded_size;
    long sent, settled_by_peer;
    int send_settled;
    int failed;
    int finished;
};

static void fail_with(struct app *a, const char *what, pn_condition_t *cond) {
    if (cond && pn_condition_is_set(cond)) {
        fprintf(stderr, "%s: %s: %s\n", what, pn_condition_get_name(cond),
                pn_condition_get_description(cond));
        a->failed = 1;
    }
}

static void finish(struct app *a, pn_connection_t *c) {
    if (!a->finished) {
        a->finished = 1;
        pn_connection_close(c);
    }
}

/* A progress line: the count so far and when the latest delivery arrived. */
static void report(struct app *a) {
    printf("{\"received\":%ld,\"presettled\":%ld,\"at\":%.6f}\n", a->received, a->presettled,
           a->last);
    fflush(stdout);
    a->reported = a->received;
}

static void on_receive_delivery(struct app *a, pn_delivery_t *d) {
    pn_link_t *l = pn_delivery_link(d);
    if (!pn_delivery_readable(d) || pn_delivery_partial(d)) return;
    size_t size = pn_delivery_pending(d);
    if (size > a->buffer_size) {
        a->buffer_size = size * 2;
        a->buffer = realloc(a->buffer, a->buffer_size);
        if (!a->buffer) {
            fprintf(stderr, "out of memory\n");
            exit(1);
        }
    }
    ssize_t n = pn_link_recv(l, a->buffer, size);
    pn_link_advance(l);
    if (n < 0 || pn_message_decode(a->message, a->buffer, (size_t)n) != 0) {
        fprintf(stderr, "undecodable message\n");
        a->failed = 1;
    }
    if (pn_delivery_settled(d)) {
        a->presettled++;
    } else {
        pn_delivery_update(d, PN_ACCEPTED);
    }
    pn_delivery_settle(d);
    double t = now_secs();
    if (a->received++ == 0) a->first = t;
    a->last = t;
    if (a->every > 0 && (a->received == 1 || a->received % a->every == 0)) report(a);
    if (pn_link_credit(l) <= a->window / 2) pn_link_flow(l, (int)(a->window - pn_link_credit(l)));
    if (a->total > 0 && a->received >= a->total) finish(a, pn_session_connection(pn_link_session(l)));
}

static void send_what_credit_allows(struct app *a, pn_link_t *l) {
    while (pn_link_credit(l) > 0 && a->sent < a->total) {
        uint64_t tag = (uint64_t)a->sent;
        pn_delivery_t *d = pn_delivery(l, pn_dtag((const char *)&tag, sizeof tag));
        pn_link_send(l, a->encoded, a->encoded_size);
        pn_link_advance(l);
        if (a->send_settled) {
            pn_delivery_settle(d);
            a->settled_by_peer++;
        }
        a->sent++;
    }
    if (a->send_settled && a->settled_by_peer >= a->total)
        finish(a, pn_session_connection(pn_link_session(l)));
}

static void handle(struct app *a, pn_event_t *e) {
    switch (pn_event_type(e)) {
    case PN_CONNECTION_INIT: {
        pn_connection_t *c = pn_event_connection(e);
        if (a->serving) break;
        pn_connection_open(c);
        pn_session_t *s = pn_session(c);
        pn_session_open(s);
        pn_link_t *l = pn_receiver(s, "loadtest-proton");
        pn_terminus_set_address(pn_link_source(l), a->address);
        /* At most once for telemetry, as Hono's applications ask for it. */
        if (strncmp(a->address, "telemetry/", 10) == 0) pn_link_set_snd_settle_mode(l, PN_SND_SETTLED);
        pn_link_open(l);
        pn_link_flow(l, (int)a->window);
        break;
    }
    case PN_CONNECTION_REMOTE_OPEN:
        if (a->serving) pn_connection_open(pn_event_connection(e));
        break;
    case PN_SESSION_REMOTE_OPEN:
        if (a->serving) pn_session_open(pn_event_session(e));
        break;
    case PN_LINK_REMOTE_OPEN:
        if (a->serving) {
            pn_link_t *l = pn_event_link(e);
            pn_terminus_copy(pn_link_source(l), pn_link_remote_source(l));
            if (a->send_settled) pn_link_set_snd_settle_mode(l, PN_SND_SETTLED);
            pn_link_open(l);
        }
        break;
    case PN_LINK_FLOW:
        if (a->serving && pn_link_is_sender(pn_event_link(e)))
            send_what_credit_allows(a, pn_event_link(e));
        break;
    case PN_DELIVERY: {
        pn_delivery_t *d = pn_event_delivery(e);
        if (!a->serving) {
            on_receive_delivery(a, d);
        } else if (pn_delivery_remote_state(d) != 0 || pn_delivery_settled(d)) {
            pn_delivery_settle(d);
            if (++a->settled_by_peer >= a->total)
                finish(a, pn_session_connection(pn_link_session(pn_delivery_link(d))));
        }
        break;
    }
    case PN_LINK_REMOTE_CLOSE:
    case PN_LINK_REMOTE_DETACH:
        fail_with(a, "link closed", pn_link_remote_condition(pn_event_link(e)));
        pn_link_close(pn_event_link(e));
        if (!a->finished) a->failed = 1, finish(a, pn_event_connection(e));
        break;
    case PN_CONNECTION_REMOTE_CLOSE:
        fail_with(a, "connection closed", pn_connection_remote_condition(pn_event_connection(e)));
        pn_connection_close(pn_event_connection(e));
        break;
    case PN_TRANSPORT_CLOSED:
        fail_with(a, "transport", pn_transport_condition(pn_event_transport(e)));
        /* One connection per run, for either side. */
        if (a->serving && !a->finished) a->failed = 1;
        pn_proactor_interrupt(a->proactor);
        break;
    case PN_PROACTOR_TIMEOUT:
        /* Every 20 ms, what arrived since the last line: competing receivers stop reading at
         * arbitrary counts, and the caller sums the last lines of all. */
        if (a->received != a->reported) report(a);
        pn_proactor_set_timeout(a->proactor, 20);
        break;
    case PN_LISTENER_ACCEPT: {
        pn_transport_t *t = pn_transport();
        pn_transport_set_server(t);
        pn_sasl_allowed_mechs(pn_sasl(t), "ANONYMOUS");
        pn_sasl_set_allow_insecure_mechs(pn_sasl(t), 1);
        pn_listener_accept2(pn_event_listener(e), NULL, t);
        break;
    }
    case PN_LISTENER_CLOSE:
        fail_with(a, "listener", pn_listener_condition(pn_event_listener(e)));
        if (a->failed) pn_proactor_interrupt(a->proactor);
        break;
    default:
        break;
    }
}

static void run(struct app *a) {
    for (;;) {
        pn_event_batch_t *batch = pn_proactor_wait(a->proactor);
        pn_event_t *e;
        int stop = 0;
        while ((e = pn_event_batch_next(batch))) {
            if (pn_event_type(e) == PN_PROACTOR_INTERRUPT) stop = 1;
            else handle(a, e);
        }
        pn_proactor_done(a->proactor, batch);
        if (stop) return;
    }
}

static int usage(void) {
    fprintf(stderr, "usage: amqp-proton receive HOST:PORT USER PASSWORD ADDRESS TOTAL [WINDOW [EVERY]]\n"
                    "       amqp-proton serve HOST:PORT TOTAL settled|unsettled [SIZE]\n");
    return 2;
}

int main(int argc, char **argv) {
    struct app a;
    memset(&a, 0, sizeof a);
    a.proactor = pn_proactor();
    if (argc >= 7 && strcmp(argv[1], "receive") == 0) {
        a.address = argv[5];
        a.total = atol(argv[6]);
        a.window = argc > 7 ? atol(argv[7]) : 1000;
        a.every = argc > 8 ? atol(argv[8]) : 0;
        a.message = pn_message();
        a.buffer_size = 4096;
        a.buffer = malloc(a.buffer_size);
        pn_connection_t *c = pn_connection();
        pn_connection_set_container(c, "loadtest-proton");
        pn_transport_t *t = pn_transport();
        if (strcmp(argv[3], "-") == 0) {
            pn_sasl_allowed_mechs(pn_sasl(t), "ANONYMOUS");
        } else {
            pn_connection_set_user(c, argv[3]);
            pn_connection_set_password(c, argv[4]);
            pn_sasl_allowed_mechs(pn_sasl(t), "PLAIN");
        }
        pn_sasl_set_allow_insecure_mechs(pn_sasl(t), 1);
        pn_proactor_connect2(a.proactor, c, t, argv[2]);
        if (a.every > 0) pn_proactor_set_timeout(a.proactor, 20);
        run(&a);
        printf("{\"messages\":%ld,\"presettled\":%ld,\"seconds\":%.6f,\"failed\":%s}\n", a.received,
               a.presettled, a.received > 1 ? a.last - a.first : 0.0,
               a.failed || a.received < a.total ? "true" : "false");
        return a.failed || a.received < a.total;
    }
    if (argc >= 5 && strcmp(argv[1], "serve") == 0) {
        a.serving = 1;
        a.total = atol(argv[3]);
        a.send_settled = strcmp(argv[4], "settled") == 0;
        size_t size = argc > 5 ? (size_t)atol(argv[5]) : 64;
        pn_message_t *m = pn_message();
        char *body = calloc(1, size);
        memset(body, 'x', size);
        pn_data_put_binary(pn_message_body(m), pn_bytes(size, body));
        pn_message_set_content_type(m, "application/octet-stream");
        pn_data_t *props = pn_message_properties(m);
        pn_data_put_map(props);
        pn_data_enter(props);
        pn_data_put_string(props, pn_bytes(9, "device_id"));
        pn_data_put_string(props, pn_bytes(10, "device-001"));
        pn_data_exit(props);
        a.encoded_size = 1024 + size;
        a.encoded = malloc(a.encoded_size);
        if (pn_message_encode(m, a.encoded, &a.encoded_size) != 0) return 1;
        pn_proactor_listen(a.proactor, pn_listener(), argv[2], 16);
        run(&a);
        return a.failed;
    }
    return usage();
}
