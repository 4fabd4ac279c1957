"""An AMQP 1.0 application written with Qpid Proton (python3-qpid-proton): signs in with SASL
PLAIN, attaches a receiver and prints what it got as JSON lines, or the error that ended it.

usage: receive.py URL USER PASSWORD ADDRESS COUNT TIMEOUT_SECONDS [at-most-once] [ca=FILE]
                  [hold=SECONDS] [keep=N]
(hold=SECONDS: stay attached that long after the last message, without granting more credit)
(keep=N: leave the last N messages unsettled)
(with ca=FILE the server certificate chain of an amqps:// URL is checked against that CA;
Proton's host-name check does not match the IP address SANs of the test certificate)
"""
import json
import sys

from proton import SSLDomain, Timeout
from proton.reactor import AtMostOnce
from proton.utils import BlockingConnection


def main():
    url, user, password, address, count, timeout = sys.argv[1:7]
    flags = sys.argv[7:]
    presettled = "at-most-once" in flags
    ssl_domain = None
    hold = 0.0
    keep = 0
    for f in flags:
        if f.startswith("hold="):
            hold = float(f[5:])
        if f.startswith("keep="):
            keep = int(f[5:])
        if f.startswith("ca="):
            ssl_domain = SSLDomain(SSLDomain.MODE_CLIENT)
            ssl_domain.set_trusted_ca_db(f[3:])
            ssl_domain.set_peer_authentication(SSLDomain.VERIFY_PEER)
    try:
        conn = BlockingConnection(url, user=user, password=password, ssl_domain=ssl_domain,
                                  allowed_mechs="PLAIN", timeout=float(timeout))
    except Exception as e:  # the sign-in was refused
        print(json.dumps({"error": "connection", "detail": str(e)}))
        return
    try:
        options = AtMostOnce() if presettled else None
        receiver = conn.create_receiver(address, credit=int(count), options=options)
        # A refused link is attached, then closed by the bridge with an error condition.
        conn.container.timeout = 1.0
        # The credit this receiver granted so far (Proton's own count).
        print(json.dumps({"attached": address, "credit": receiver.link.credit}), flush=True)
        for n in range(int(count)):
            msg = receiver.receive(timeout=float(timeout))
            if n < int(count) - keep:
                receiver.accept()
            print(json.dumps({
                "body": bytes(msg.body).decode("utf-8", "replace") if msg.body is not None else None,
                "to": msg.address,
                "content_type": msg.content_type,
                "creation_time": msg.creation_time,
                "durable": msg.durable,
                "properties": {k: v for k, v in (msg.properties or {}).items()},
                "annotations": {str(k): v for k, v in (msg.annotations or {}).items()},
            }), flush=True)
        if keep:
            # Proton sends the accepted ones' dispositions only while its loop runs.
            try:
                conn.wait(lambda: False, timeout=0.5)
            except Timeout:
                pass
        if hold:
            print(json.dumps({"holding": hold}), flush=True)
            import time
            time.sleep(hold)
    except Timeout:
        print(json.dumps({"error": "timeout"}))
    except Exception as e:
        condition = getattr(getattr(e, "link", None), "remote_condition", None)
        print(json.dumps({"error": "link",
                          "condition": condition.name if condition else None,
                          "detail": str(e)}))
    finally:
        try:
            conn.close()
        except Exception:
            pass


main()
