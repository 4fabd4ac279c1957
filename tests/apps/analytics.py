"""An analytics user and a Hono application against Ferrule's typed telemetry, with the clients
such users run: confluent-kafka-python's SchemaRegistryClient and AvroDeserializer (fastavro),
and Qpid Proton for the AMQP 1.0 application.

Subcommands, each printing JSON lines (`error` and exit 1 on failure):

  register URL USER:PASSWORD SUBJECT SCHEMA
      registers SCHEMA (JSON text) under SUBJECT; prints `registered` with the id, and the
      latest version as the client reads it back.
  refused URL USER:PASSWORD SUBJECT SCHEMA
      registers SCHEMA expecting the registry to refuse it; prints `refused` with the HTTP
      status and Confluent error code.
  consume BOOTSTRAP URL USER:PASSWORD TOPIC WANT TIMEOUT_SECONDS
      reads TOPIC from its beginning with the AvroDeserializer, the registry asked with
      USER:PASSWORD; prints `record` for each (the decoded value and the schema id of its
      wire format), until WANT were read, then waits a second more for any extra record and
      prints `done`.
  amqp URL USER PASSWORD TENANT WANT TIMEOUT_SECONDS [avro]
      receives WANT telemetry messages of TENANT; prints `ready` once the link is attached and
      `message` with each one's content type and body (hex, and text when it is UTF-8). With
      `avro` the link asks for the typed form (link property `ferrule-payload-format`).
"""
import json
import sys
import time


def out(**line):
    print(json.dumps(line), flush=True)


def fail(reason):
    out(error=reason)
    sys.exit(1)


def registry(url, auth):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    return SchemaRegistryClient({"url": url, "basic.auth.user.info": auth})


def register(url, auth, subject, schema_text):
    from confluent_kafka.schema_registry import Schema
    client = registry(url, auth)
    schema_id = client.register_schema(subject, Schema(schema_text, "AVRO"))
    latest = client.get_latest_version(subject)
    out(registered={"id": schema_id, "version": latest.version, "latest_id": latest.schema_id,
                    "compatibility": client.get_compatibility()})


def refused(url, auth, subject, schema_text):
    from confluent_kafka.schema_registry import Schema
    from confluent_kafka.schema_registry.error import SchemaRegistryError
    client = registry(url, auth)
    try:
        schema_id = client.register_schema(subject, Schema(schema_text, "AVRO"))
    except SchemaRegistryError as e:
        out(refused={"status": e.http_status_code, "code": e.error_code, "message": e.error_message})
        return
    fail("registered as %s" % schema_id)


def consume(bootstrap, url, auth, topic, want, timeout):
    from confluent_kafka import Consumer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    deserializer = AvroDeserializer(registry(url, auth))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "analytics-%f" % time.time(),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    deadline = time.monotonic() + float(timeout)
    seen = 0
    extra_until = None
    while time.monotonic() < deadline and (extra_until is None or time.monotonic() < extra_until):
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            continue
        raw = msg.value()
        value = deserializer(raw, SerializationContext(topic, MessageField.VALUE))
        headers = {k: (v.decode() if v is not None else None) for k, v in (msg.headers() or [])}
        out(record={"value": value, "schema_id": int.from_bytes(raw[1:5], "big"),
                    "magic": raw[0], "content_type": headers.get("content-type"),
                    "device": headers.get("device_id")})
        seen += 1
        if seen >= int(want) and extra_until is None:
            extra_until = time.monotonic() + 1.0
    consumer.close()
    if seen < int(want):
        fail("only %d of %s records within %s s" % (seen, want, timeout))
    out(done={"records": seen})


def amqp(url, user, password, tenant, want, timeout, typed):
    from proton import symbol
    from proton.reactor import LinkOption
    from proton.utils import BlockingConnection

    class PayloadFormat(LinkOption):
        def apply(self, link):
            link.properties = {symbol("ferrule-payload-format"): "avro"}

    conn = BlockingConnection(url, user=user, password=password, allowed_mechs="PLAIN",
                              timeout=float(timeout))
    options = PayloadFormat() if typed else None
    receiver = conn.create_receiver("telemetry/%s" % tenant, credit=50, options=options)
    out(ready=True)
    for _ in range(int(want)):
        msg = receiver.receive(timeout=float(timeout))
        receiver.accept()
        body = msg.body
        if body is not None and not isinstance(body, str):
            body = bytes(body)
        if isinstance(body, str):
            body = body.encode("utf-8")
        body = body or b""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        shown = {"text": text, "hex": body.hex()}
        out(message={"content_type": msg.content_type, "body": shown,
                     "device": (msg.annotations or {}).get("device_id")})
    conn.close()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    try:
        if cmd == "register":
            register(*args[:4])
        elif cmd == "refused":
            refused(*args[:4])
        elif cmd == "consume":
            consume(*args[:6])
        elif cmd == "amqp":
            amqp(*args[:6], typed=len(args) > 6 and args[6] == "avro")
        else:
            fail("unknown subcommand %s" % cmd)
    except Exception as e:  # every failure is a JSON line for the test to show
        fail("%s: %s" % (type(e).__name__, e))


if __name__ == "__main__":
    main()
