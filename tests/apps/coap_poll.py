"""A constrained device that long-polls for a command with aiocoap (PyPI): one confirmable
`PUT` of an empty telemetry notification to URI (which carries `hono-ttd` and `empty`), then the answer,
piggybacked or separate (aiocoap acknowledges a separate response).

Prints JSON lines: `answer` with the response code and payload, or `error`.

usage: coap_poll.py URI TIMEOUT_SECONDS
"""
import asyncio
import json
import sys

from aiocoap import PUT, Context, Message


async def main():
    uri, timeout = sys.argv[1], float(sys.argv[2])
    ctx = await Context.create_client_context()
    try:
        resp = await asyncio.wait_for(ctx.request(Message(code=PUT, uri=uri)).response, timeout)
        print(json.dumps({"answer": {"code": str(resp.code), "mtype": str(resp.mtype),
                                     "payload": resp.payload.decode("utf-8", "replace")}}),
              flush=True)
    except Exception as e:  # no answer in time, or a network error
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}), flush=True)
    finally:
        await ctx.shutdown()


asyncio.run(main())
