"""Independent WebSocket peers (Python `websockets`) for the end-to-end tests.

server PORT [HOST]
              echo server (on 127.0.0.1 unless HOST); prints READY. Answers
              the text "whoami" with a JSON object naming the subprotocol and
              extensions it negotiated.
client URL    runs a conversation through the proxy and prints one JSON line
              with what it saw.
bulk URL N    without compression: one text message, a pause, N random
              1 MiB binary messages, then 200 small text messages, each
              echoed and compared; prints one JSON line with the counts.
"""
import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def echo(ws):
    async for msg in ws:
        if msg == "whoami":
            exts = [type(e).__name__ + ":" + e.name for e in ws.protocol.extensions]
            await ws.send(json.dumps({"subprotocol": ws.subprotocol, "extensions": exts}))
        else:
            await ws.send(msg)


async def server(port, host):
    async with serve(echo, host, port, subprotocols=["chat", "superchat"],
                     max_size=64 << 20):
        print("READY", flush=True)
        await asyncio.Future()


async def client(url):
    out = {}
    async with connect(url, subprotocols=["superchat", "chat"], max_size=64 << 20) as ws:
        out["subprotocol"] = ws.subprotocol
        out["extensions"] = [e.name for e in ws.protocol.extensions]
        await ws.send("hello")
        out["text"] = await ws.recv()
        await ws.send(bytes(range(256)) * 4)
        out["binary_ok"] = (await ws.recv()) == bytes(range(256)) * 4
        # A fragmented message: an iterable is sent as one message in fragments.
        await ws.send(["frag", "mented ", "message"])
        out["fragmented"] = await ws.recv()
        big = bytes(i % 251 for i in range(4 << 20))
        await ws.send(big)
        out["big_ok"] = (await ws.recv()) == big
        pong = await ws.ping(b"p")
        await asyncio.wait_for(pong, 10)
        out["pong"] = True
        await ws.send("whoami")
        out["server"] = json.loads(await ws.recv())
        await ws.close(code=4001, reason="py bye")
        out["close_code"] = ws.close_code
    print(json.dumps(out), flush=True)


async def bulk(url, n):
    out = {"bulk": 0, "small": 0}
    async with connect(url, subprotocols=["chat"], max_size=64 << 20, compression=None) as ws:
        await ws.send("hello")
        out["text"] = await ws.recv()
        # An idle moment: tcpsplice joins the session here.
        await asyncio.sleep(0.3)
        for _ in range(n):
            b = os.urandom(1 << 20)
            await ws.send(b)
            if await ws.recv() != b:
                break
            out["bulk"] += 1
        for i in range(200):
            await ws.send(str(i))
            if await ws.recv() != str(i):
                break
            out["small"] += 1
        await ws.close()
        out["close_code"] = ws.close_code
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
        asyncio.run(server(int(sys.argv[2]), host))
    elif sys.argv[1] == "bulk":
        asyncio.run(bulk(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(client(sys.argv[2]))
