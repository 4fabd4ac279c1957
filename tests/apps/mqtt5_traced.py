"""An MQTT 5 device written with paho-mqtt (Debian's python3-paho-mqtt) that sends telemetry at
QoS 1 carrying a W3C trace context as the user properties `traceparent` (and `tracestate`),
one message every 200 ms until the time is up or it is stopped.

Prints JSON lines: `connected`, then `acked` with each message's number; or `error`.

usage: mqtt5_traced.py HOST PORT USER PASSWORD TRACEPARENT TRACESTATE TIMEOUT_SECONDS
"""
import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def out(**line):
    print(json.dumps(line), flush=True)


def main():
    host, port, user, password, traceparent, tracestate, timeout = sys.argv[1:8]
    client = mqtt.Client(client_id="traced-%d" % time.time_ns(), protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    try:
        client.connect(host, int(port))
    except Exception as e:
        out(error=str(e))
        sys.exit(1)
    client.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("traceparent", traceparent)]
    if tracestate:
        props.UserProperty.append(("tracestate", tracestate))
    out(connected=True)
    deadline = time.monotonic() + float(timeout)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        info = client.publish("telemetry", payload=b"traced-%d" % n, qos=1, properties=props)
        info.wait_for_publish(5)
        out(acked=n)
        time.sleep(0.2)
    client.loop_stop()
    client.disconnect()


main()
