"""A Hono application sending a request/response command over AMQP 1.0 with Qpid Proton:
a malformed command first (must be rejected), then a good one, whose response it waits for.
Prints JSON lines.

usage: command.py URL USER PASSWORD TENANT DEVICE TIMEOUT_SECONDS [TRACEPARENT]
(TRACEPARENT: a W3C trace context the command carries as its application property
`traceparent`; the response line shows the response's)
"""
import json
import sys

from proton import Message
from proton.utils import BlockingConnection, SendException


def main():
    url, user, password, tenant, device, timeout = sys.argv[1:7]
    traceparent = sys.argv[7] if len(sys.argv) > 7 else None
    conn = BlockingConnection(url, user=user, password=password,
                              allowed_mechs="PLAIN", timeout=float(timeout))
    reply_to = "command_response/%s/app-replies" % tenant
    replies = conn.create_receiver(reply_to, credit=10)
    sender = conn.create_sender("command/%s" % tenant)
    try:
        sender.send(Message(address="command/%s/%s" % (tenant, device), body=b"no subject",
                            inferred=True))
        print(json.dumps({"malformed": "accepted"}), flush=True)
    except SendException as e:
        print(json.dumps({"malformed": str(e.state)}), flush=True)
    command = Message(address="command/%s/%s" % (tenant, device), subject="setVolume",
                      reply_to=reply_to, correlation_id="corr-1", content_type="text/plain",
                      body=b"5", inferred=True)
    if traceparent:
        command.properties = {"traceparent": traceparent}
    sender.send(command)
    print(json.dumps({"sent": "accepted"}), flush=True)
    response = replies.receive(timeout=float(timeout))
    replies.accept()
    props = response.properties or {}
    print(json.dumps({
        "correlation_id": response.correlation_id,
        "status": props.get("status"),
        "device_id": props.get("device_id"),
        "tenant_id": props.get("tenant_id"),
        "content_type": response.content_type,
        "traceparent": props.get("traceparent"),
        "body": bytes(response.body).decode("utf-8", "replace") if response.body is not None else None,
    }), flush=True)
    conn.close()


main()
