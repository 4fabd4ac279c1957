"""Hono's example application on the AMQP 1.0 northbound API, written with Qpid Proton
(python3-qpid-proton): it consumes its tenant's events and, when a device announces that it can
take a command now (an event with `ttd`: Hono's device notifications), sends that device a request/response command
and waits for the response on its own reply address. Nothing is sent before the notification.

Prints JSON lines: `ready` (links attached), `skipped` (events that do not announce the device),
`notification`, `command` (the bridge's disposition), `response`; or `error`, and exits 1.

usage: amqp_application.py URL USER PASSWORD TENANT DEVICE TIMEOUT_SECONDS
"""
import json
import random
import sys
import time
import uuid

from proton import Message, Timeout
from proton.utils import BlockingConnection, SendException


def out(**line):
    print(json.dumps(line), flush=True)


def fail(reason):
    out(error=reason)
    sys.exit(1)


def text(body):
    if body is None:
        return ""
    if isinstance(body, str):
        return body
    return bytes(body).decode("utf-8", "replace")


def main():
    url, user, password, tenant, device, timeout = sys.argv[1:7]
    deadline = time.monotonic() + float(timeout)

    def left():
        return max(0.1, deadline - time.monotonic())

    conn = BlockingConnection(url, user=user, password=password, allowed_mechs="PLAIN",
                              timeout=float(timeout))
    # The reply link is attached before any command goes out, so no response can be missed.
    reply_to = "command_response/%s/example-app-%s" % (tenant, uuid.uuid4().hex)
    responses = conn.create_receiver(reply_to, credit=10)
    events = conn.create_receiver("event/%s" % tenant, credit=10)
    commands = conn.create_sender("command/%s" % tenant)
    out(ready={"events": "event/%s" % tenant, "reply_to": reply_to})

    # A device is reachable for commands from the creation time of its notification on: until
    # further notice with ttd -1, for ttd seconds with ttd > 0.
    while True:
        try:
            event = events.receive(timeout=left())
        except Timeout:
            fail("no event announced %s within %s s" % (device, timeout))
        events.accept()
        props = event.properties or {}
        seen = {
            "device_id": props.get("device_id"),
            "ttd": props.get("ttd"),
            "content_type": event.content_type,
            "orig_adapter": props.get("orig_adapter"),
            "qos": props.get("qos"),
            "creation_time": event.creation_time,
            "body": text(event.body),
        }
        ttd = props.get("ttd")
        if props.get("device_id") != device or ttd is None:
            out(skipped=seen)
            continue
        ttd = int(ttd)
        created = event.creation_time or time.time()
        seen["reachable"] = ttd == -1 or (ttd > 0 and time.time() < created + ttd)
        out(notification=seen)
        if seen["reachable"]:
            break

    correlation_id = "example-%s" % uuid.uuid4().hex
    payload = json.dumps({"brightness": random.randint(0, 100)})
    command = Message(address="command/%s/%s" % (tenant, device), subject="setBrightness",
                      reply_to=reply_to, correlation_id=correlation_id,
                      content_type="application/json", body=payload.encode(), inferred=True)
    sent = {"correlation_id": correlation_id, "subject": "setBrightness", "payload": payload}
    try:
        commands.send(command, timeout=left())
        sent["outcome"] = "ACCEPTED"
        out(command=sent)
    except SendException as e:
        sent["outcome"] = str(e.state)
        out(command=sent)
        fail("the command was not accepted")
    except Timeout:
        fail("the command was not settled within %s s" % timeout)

    while True:
        try:
            response = responses.receive(timeout=left())
        except Timeout:
            fail("no response to %s within %s s" % (correlation_id, timeout))
        responses.accept()
        props = response.properties or {}
        got = {
            "correlation_id": response.correlation_id,
            "status": props.get("status"),
            "device_id": props.get("device_id"),
            "tenant_id": props.get("tenant_id"),
            "content_type": response.content_type,
            "body": text(response.body),
        }
        if response.correlation_id == correlation_id:
            out(response=got)
            break
        out(skipped=got)
    conn.close()


main()
