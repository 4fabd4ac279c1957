"""A device on MQTT 3.1.1 written with paho-mqtt (Debian's python3-paho-mqtt): it signs in with
its password, subscribes to its commands at QoS 1 (`command///req/#`, Hono's MQTT adapter) and answers the first
request/response command on `command///res/<req-id>/200` with a JSON payload that echoes
the command's, then leaves once the adapter acknowledged the answer.

Prints JSON lines: `connected`, `subscribed` (the granted QoS), `command`, `responded`; or
`error`, and exits 1.

With LINGER_SECONDS it stays connected that long after the answer was acknowledged.

usage: mqtt_device.py HOST PORT USER PASSWORD TIMEOUT_SECONDS [LINGER_SECONDS]
"""
import json
import sys
import time
import uuid

import paho.mqtt.client as mqtt


def out(**line):
    print(json.dumps(line), flush=True)


def main():
    host, port, user, password, timeout = sys.argv[1:6]
    deadline = time.monotonic() + float(timeout)
    linger = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    client_id = "example-device-%s" % uuid.uuid4().hex[:8]
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id)
    else:
        client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    state = {"done": False, "failed": None, "answer": None}

    def on_connect(c, _userdata, _flags, rc):
        out(connected=rc)
        if rc != 0:
            state["failed"] = "CONNACK %s" % rc
            return
        c.subscribe("command///req/#", qos=1)

    def on_subscribe(_c, _userdata, _mid, granted):
        out(subscribed=list(granted))
        if any(q not in (0, 1) for q in granted):
            state["failed"] = "subscription refused"

    def on_message(c, _userdata, msg):
        # command///req/<req-id>/<subject>
        parts = msg.topic.split("/")
        text = msg.payload.decode("utf-8", "replace")
        out(command={"topic": msg.topic, "payload": text})
        if len(parts) != 6 or parts[3] != "req" or not parts[4]:
            state["failed"] = "not a request/response command: %s" % msg.topic
            return
        try:
            request = json.loads(text)
        except ValueError:
            request = text
        answer = json.dumps({"applied": request})
        topic = "command///res/%s/200/?content-type=application%%2Fjson" % parts[4]
        state["answer"] = (c.publish(topic, answer, qos=1).mid, topic, answer)

    def on_publish(_c, _userdata, mid):
        if state["answer"] and state["answer"][0] == mid:
            out(responded={"topic": state["answer"][1], "payload": state["answer"][2]})
            state["done"] = True

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_publish = on_publish
    client.connect(host, int(port), keepalive=30)
    while not state["done"] and not state["failed"]:
        if time.monotonic() > deadline:
            state["failed"] = "no command within %s s" % timeout
            break
        rc = client.loop(timeout=0.2)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            state["failed"] = "connection lost: %s" % mqtt.error_string(rc)
    end = time.monotonic() + linger
    while not state["failed"] and time.monotonic() < end:
        client.loop(timeout=0.1)
    client.disconnect()
    if state["failed"]:
        out(error=state["failed"])
        sys.exit(1)


main()
