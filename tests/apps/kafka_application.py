"""Hono's example application on the Kafka-based northbound API, written with confluent-kafka
(from PyPI; scripts/lib.sh installs it): it consumes `hono.event.<tenant>` and, when a device
announces that it can take a command now (a record with a `ttd` header, as Hono's Kafka-based event API has it), writes
a request/response command for it to `hono.command.<tenant>` (Hono's Kafka-based Command & Control API) and waits for the response
with its correlation id on `hono.command_response.<tenant>`. Nothing is sent before the
notification.

Prints JSON lines: `ready` (subscribed), `skipped` (records that do not announce the device),
`notification`, `command` (written), `response`; or `error`, and exits 1.

usage: kafka_application.py BOOTSTRAP TENANT DEVICE TIMEOUT_SECONDS [TOPIC_PREFIX] [TRACEPARENT]
(TOPIC_PREFIX: what the deployment puts before Hono's topic names, its `kafka.topic_prefix`;
TRACEPARENT: a W3C trace context the command carries as its `traceparent` header; the
`response` line then shows the response record's `traceparent`)
"""
import json
import random
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, Producer


def out(**line):
    print(json.dumps(line), flush=True)


def fail(reason):
    out(error=reason)
    sys.exit(1)


def headers(record):
    """Header name -> value as text; the first of repeated headers wins (Hono's Kafka header encoding)."""
    found = {}
    for key, value in record.headers() or []:
        if key not in found:
            found[key] = value.decode("utf-8", "replace") if value is not None else None
    return found


def json_header(h, key):
    """A header written JSON-encoded (numbers, booleans), or None when absent or undecodable."""
    try:
        return json.loads(h[key]) if h.get(key) is not None else None
    except ValueError:
        return None


def consumer(bootstrap, topic):
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "example-app-%s" % uuid.uuid4().hex,
        # A new group reads the topic from its start: a notification written before the group
        # got its partitions still arrives.
        "auto.offset.reset": "earliest",
        # The tenant's topics are made by Ferrule when the first record is written; look for
        # them often.
        "topic.metadata.refresh.interval.ms": 500,
    })
    c.subscribe([topic])
    return c


def poll(c):
    """The next record, or None; a topic that does not exist yet is not an error."""
    record = c.poll(0.2)
    if record is None:
        return None
    if record.error():
        if record.error().code() not in (KafkaError.UNKNOWN_TOPIC_OR_PART,
                                          KafkaError._PARTITION_EOF):
            out(kafka_error=str(record.error()))
        return None
    return record


def next_record(c, deadline, why_not):
    """The next record of consumer `c` and its headers; fails with `why_not` past `deadline`."""
    while True:
        if time.monotonic() > deadline:
            fail(why_not)
        record = poll(c)
        if record is not None:
            return record, headers(record)


def main():
    bootstrap, tenant, device, timeout = sys.argv[1:5]
    prefix = sys.argv[5] if len(sys.argv) > 5 else ""
    traceparent = sys.argv[6] if len(sys.argv) > 6 else None
    deadline = time.monotonic() + float(timeout)
    events = consumer(bootstrap, "%shono.event.%s" % (prefix, tenant))
    responses = consumer(bootstrap, "%shono.command_response.%s" % (prefix, tenant))
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    out(ready={"events": "%shono.event.%s" % (prefix, tenant)})

    # A device is reachable for commands from the creation time of its notification on: until
    # further notice with ttd -1, for ttd seconds with ttd > 0.
    while True:
        record, h = next_record(events, deadline,
                                "no event announced %s within %s s" % (device, timeout))
        ttd = json_header(h, "ttd")
        created = json_header(h, "creation-time")
        seen = {
            "key": record.key().decode() if record.key() is not None else None,
            "device_id": h.get("device_id"),
            "ttd": ttd,
            "content_type": h.get("content-type"),
            "orig_adapter": h.get("orig_adapter"),
            "qos": json_header(h, "qos"),
            "creation_time": created,
            "body": (record.value() or b"").decode("utf-8", "replace"),
        }
        if h.get("device_id") != device or not isinstance(ttd, int):
            out(skipped=seen)
            continue
        now_ms = time.time() * 1000
        seen["reachable"] = ttd == -1 or (ttd > 0 and now_ms < (created or now_ms) + ttd * 1000)
        out(notification=seen)
        if seen["reachable"]:
            break

    correlation_id = "example-%s" % uuid.uuid4().hex
    payload = json.dumps({"brightness": random.randint(0, 100)})
    delivered = []
    producer.produce(
        "%shono.command.%s" % (prefix, tenant),
        key=device,
        value=payload.encode(),
        headers=[
            ("device_id", device),
            ("subject", "setBrightness"),
            ("correlation-id", correlation_id),
            ("response-required", "true"),
            ("content-type", "application/json"),
        ] + ([("traceparent", traceparent)] if traceparent else []),
        on_delivery=lambda err, _record: delivered.append(err),
    )
    producer.flush(max(0.1, deadline - time.monotonic()))
    sent = {"correlation_id": correlation_id, "subject": "setBrightness", "payload": payload}
    if not delivered or delivered[0] is not None:
        sent["outcome"] = str(delivered[0]) if delivered else "not delivered in time"
        out(command=sent)
        fail("the broker did not take the command")
    sent["outcome"] = "written"
    out(command=sent)

    while True:
        record, h = next_record(responses, deadline,
                                "no response to %s within %s s" % (correlation_id, timeout))
        got = {
            "key": record.key().decode() if record.key() is not None else None,
            "correlation_id": h.get("correlation-id"),
            "status": json_header(h, "status"),
            "device_id": h.get("device_id"),
            "tenant_id": h.get("tenant_id"),
            "content_type": h.get("content-type"),
            "traceparent": h.get("traceparent"),
            "body": (record.value() or b"").decode("utf-8", "replace"),
        }
        if got["correlation_id"] == correlation_id:
            out(response=got)
            break
        out(skipped=got)
    events.close()
    responses.close()


main()
