"""A device on MQTT 3.1.1 written with paho-mqtt (Debian's python3-paho-mqtt) that publishes
telemetry at QoS 1 as fast as the adapter acknowledges it, up to WINDOW messages unacknowledged,
until the adapter closes the connection or the time is up — or, with `reconnect`, until the time
is up, connecting again whenever the connection is lost (paho sends the unacknowledged messages
again after a reconnect). On every connection it subscribes to its commands (`command///req/#`),
so the gateway holds a command consumer for it. Payloads are `<run>-<n>`.

Prints JSON lines: `connected`, `subscribed` (each time), `flowing` (once 50 messages were
acknowledged), then at the end `done` with `acked` (the payloads the adapter acknowledged with
PUBACK), `published` (how many were sent) and `commands` (the topics of the commands received);
or `error`, and exits 1.

With `listen` it publishes nothing: it only counts the commands it receives until the time is
up, printing `command` with each one's topic (and `subscribed` as soon as it is subscribed). With `event` it publishes events
instead of telemetry (QoS 1 all the same).

usage: mqtt_publisher.py HOST PORT USER PASSWORD RUN_ID TIMEOUT_SECONDS [reconnect] [listen]
       [event]
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

WINDOW = 20


def out(**line):
    print(json.dumps(line), flush=True)


def main():
    host, port, user, password, run_id, timeout = sys.argv[1:7]
    reconnect = "reconnect" in sys.argv[7:]
    listen = "listen" in sys.argv[7:]
    topic = "event" if "event" in sys.argv[7:] else "telemetry"
    deadline = time.monotonic() + float(timeout)
    client_id = "publisher-%s" % run_id
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id)
    else:
        client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(WINDOW)
    lock = threading.Condition()
    state = {"up": False, "closed": False, "subscribed": False, "failed": None}
    outstanding = {}  # mid -> payload
    acked = []
    commands = []

    def on_connect(c, _userdata, _flags, rc):
        out(connected=rc)
        if rc != 0:
            state["failed"] = "CONNACK %s" % rc
        else:
            c.subscribe("command///req/#", qos=1)
        with lock:
            state["up"] = rc == 0
            lock.notify_all()

    def on_subscribe(_c, _userdata, _mid, granted):
        out(subscribed=list(granted))
        with lock:
            state["subscribed"] = True
            lock.notify_all()

    early = set()  # acknowledged before `publish` returned its mid

    def ack(payload):
        acked.append(payload)
        if len(acked) == 50:
            out(flowing=len(acked))

    def on_publish(_c, _userdata, mid):
        with lock:
            payload = outstanding.pop(mid, None)
            if payload is None:
                early.add(mid)
            else:
                ack(payload)
            lock.notify_all()

    def on_disconnect(_c, _userdata, rc):
        with lock:
            state["up"] = False
            state["closed"] = not reconnect
            lock.notify_all()

    def on_message(_c, _userdata, msg):
        with lock:
            commands.append(msg.topic)
        if listen:
            out(command=msg.topic)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.reconnect_delay_set(min_delay=0.2, max_delay=1)
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    with lock:
        while not state["subscribed"] and not state["failed"] and time.monotonic() < deadline:
            lock.wait(0.1)
    if not state["subscribed"]:
        client.loop_stop()
        out(error=state["failed"] or "no SUBACK")
        sys.exit(1)
    published = 0
    while listen and time.monotonic() < deadline:
        time.sleep(0.1)
    while time.monotonic() < deadline:
        with lock:
            while (len(outstanding) >= WINDOW or not state["up"]) and not state["closed"]:
                lock.wait(0.1)
                if time.monotonic() >= deadline:
                    break
            if state["closed"] or time.monotonic() >= deadline:
                break
        # Not under the lock: paho calls on_publish holding locks of its own.
        payload = "%s-%d" % (run_id, published)
        info = client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not reconnect:
            break
        published += 1
        with lock:
            if info.mid in early:
                early.discard(info.mid)
                ack(payload)
            else:
                outstanding[info.mid] = payload
    # The end: what was not acknowledged by now stays unacknowledged.
    client.loop_stop()
    with lock:
        out(done={"acked": acked, "published": published, "commands": commands})


if __name__ == "__main__":
    main()
