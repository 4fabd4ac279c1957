"""A Hono application consuming its tenant's events over AMQP 1.0 with Qpid Proton
(python3-qpid-proton), accepting each (unsettled delivery: at least once). When the connection
is lost it signs in again — through the load balancer, to whichever bridge answers — and goes
on, until it has seen WANT different event bodies or the time is up. With PACE_MS it takes
that long over each event, a slow application.

Prints JSON lines: `attached` (each time the link is up), `progress` (every 100 distinct
bodies), `reconnecting` (with the error), then `done` with `bodies` (every distinct body seen),
`received` (deliveries, duplicates included) and `connections`.

usage: amqp_events.py URL USER PASSWORD TENANT WANT TIMEOUT_SECONDS [PACE_MS]
"""
import json
import sys
import time

from proton.utils import BlockingConnection


def out(**line):
    print(json.dumps(line), flush=True)


def main():
    url, user, password, tenant, want, timeout = sys.argv[1:7]
    want = int(want)
    pace = float(sys.argv[7]) / 1000 if len(sys.argv) > 7 else 0.0
    deadline = time.monotonic() + float(timeout)
    seen, received, connections = set(), 0, 0
    while len(seen) < want and time.monotonic() < deadline:
        conn = None
        try:
            conn = BlockingConnection(url, user=user, password=password,
                                      allowed_mechs="PLAIN", timeout=5)
            connections += 1
            receiver = conn.create_receiver("event/%s" % tenant, credit=100)
            out(attached=connections)
            while len(seen) < want and time.monotonic() < deadline:
                msg = receiver.receive(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                body = bytes(msg.body).decode("utf-8", "replace") if msg.body is not None else ""
                if pace:
                    time.sleep(pace)
                receiver.accept()
                received += 1
                if body not in seen:
                    seen.add(body)
                    if len(seen) % 100 == 0:
                        out(progress=len(seen))
        except Exception as e:  # the bridge went away, or nothing came in time
            out(reconnecting=type(e).__name__, detail=str(e)[:200])
            time.sleep(0.5)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
    out(done={"bodies": sorted(seen), "received": received, "connections": connections})


main()
