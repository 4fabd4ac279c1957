"""A Kafka client for the tests, written with confluent-kafka (from PyPI; scripts/lib.sh installs
it), that takes librdkafka properties the way kcat does (`-X security.protocol=sasl_ssl`), so the
tests read and write topics of a secured broker with TLS and SASL like any application would.

Prints JSON lines; the errors librdkafka reports through its error callback (a failed TLS
handshake, a refused SASL login) are printed as `client_error` lines as they happen.

usage: kafka_client.py [-X KEY=VALUE]... consume TOPIC COUNT TIMEOUT_SECONDS
           `record` lines ({key, headers, value}) until COUNT records came; exits 1 with an
           `error` line if they did not within the time
       kafka_client.py [-X KEY=VALUE]... produce TOPIC KEY VALUE [HEADER=VALUE]...
           a `delivered` line ({topic, partition, offset}) once the broker has the record, or
           an `error` line and exit 1
       kafka_client.py [-X KEY=VALUE]... metadata TIMEOUT_SECONDS
           a `brokers` line, or an `error` line and exit 1
       kafka_client.py [-X KEY=VALUE]... create TOPIC PARTITIONS
           a `created` line once the broker made the topic, or an `error` line and exit 1
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def out(**line):
    print(json.dumps(line), flush=True)


def fail(reason):
    out(error=reason)
    sys.exit(1)


def parse(argv):
    props, rest = {}, []
    args = iter(argv)
    for a in args:
        if a == "-X":
            key, _, value = next(args).partition("=")
            props[key] = value
        else:
            rest.append(a)
    return props, rest


def with_callbacks(props):
    def error_cb(err):
        out(client_error=str(err))

    return dict(props, error_cb=error_cb)


def consume(props, topic, count, timeout):
    deadline = time.monotonic() + float(timeout)
    c = Consumer(with_callbacks(dict({
        "group.id": "test-%s" % uuid.uuid4().hex,
        "auto.offset.reset": "earliest",
        # The tenant's topics appear when Ferrule writes their first record: look often.
        "topic.metadata.refresh.interval.ms": 500,
    }, **props)))
    c.subscribe([topic])
    got = 0
    try:
        while got < int(count):
            if time.monotonic() > deadline:
                fail("%d of %s records on %s within %s s" % (got, count, topic, timeout))
            record = c.poll(0.2)
            if record is None:
                continue
            if record.error():
                if record.error().code() not in (KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                  KafkaError._PARTITION_EOF):
                    out(client_error=str(record.error()))
                continue
            got += 1
            out(record={
                "key": record.key().decode("utf-8", "replace") if record.key() is not None else None,
                "headers": {k: (v.decode("utf-8", "replace") if v is not None else None)
                            for k, v in reversed(record.headers() or [])},
                "value": (record.value() or b"").decode("utf-8", "replace"),
            })
    finally:
        c.close()


def produce(props, topic, key, value, headers):
    p = Producer(with_callbacks(dict({"acks": "all"}, **props)))
    delivered = []
    p.produce(topic, key=key, value=value.encode(),
              headers=[tuple(h.split("=", 1)) for h in headers],
              on_delivery=lambda err, record: delivered.append((err, record)))
    p.flush(30)
    if not delivered:
        fail("not delivered within 30 s")
    err, record = delivered[0]
    if err is not None:
        fail(str(err))
    out(delivered={"topic": record.topic(), "partition": record.partition(),
                   "offset": record.offset()})


def metadata(props, timeout):
    p = Producer(with_callbacks(props))
    try:
        md = p.list_topics(timeout=float(timeout))
    except Exception as e:  # KafkaException: what the request ended with
        fail(str(e))
    out(brokers=["%s:%d" % (b.host, b.port) for b in md.brokers.values()])


def create(props, topic, partitions):
    admin = AdminClient(with_callbacks(props))
    futures = admin.create_topics([NewTopic(topic, num_partitions=int(partitions),
                                            replication_factor=1)])
    try:
        futures[topic].result(30)
    except Exception as e:  # KafkaException: what the broker answered
        fail(str(e))
    out(created=topic)


def main():
    props, rest = parse(sys.argv[1:])
    command, args = rest[0], rest[1:]
    if command == "consume":
        consume(props, *args)
    elif command == "produce":
        produce(props, args[0], args[1], args[2], args[3:])
    elif command == "metadata":
        metadata(props, *args)
    elif command == "create":
        create(props, *args)
    else:
        fail("unknown command %s" % command)


main()
