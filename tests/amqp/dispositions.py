"""A Hono application sending commands over AMQP 1.0 with Qpid Proton and reporting how the
bridge settled each transfer (Hono's AMQP APIs), then how many responses reached its reply link.
Prints JSON lines.

usage: dispositions.py URL USER PASSWORD TENANT TIMEOUT_SECONDS STEP...
STEP: rr:<device> (request/response command) or ow:<device> (one-way command)
"""
import json
import sys

from proton import Message, Timeout
from proton.utils import BlockingConnection, SendException


def main():
    url, user, password, tenant, timeout = sys.argv[1:6]
    conn = BlockingConnection(url, user=user, password=password,
                              allowed_mechs="PLAIN", timeout=float(timeout))
    reply_to = "command_response/%s/app-replies" % tenant
    replies = conn.create_receiver(reply_to, credit=10)
    sender = conn.create_sender("command/%s" % tenant)
    for n, step in enumerate(sys.argv[6:]):
        kind, device = step.split(":", 1)
        command = Message(address="command/%s/%s" % (tenant, device), subject="setVolume",
                          body=b"5", inferred=True)
        if kind == "rr":
            command.reply_to = reply_to
            command.correlation_id = "corr-%d" % n
        try:
            sender.send(command)
            outcome = "ACCEPTED"
        except SendException as e:
            outcome = str(e.state)
        print(json.dumps({"step": step, "outcome": outcome}), flush=True)
    # In AMQP mode a failed delivery is told by the disposition, not by a response.
    responses = 0
    try:
        while True:
            replies.receive(timeout=2)
            replies.accept()
            responses += 1
    except Timeout:
        pass
    print(json.dumps({"responses": responses}), flush=True)
    conn.close()


main()
