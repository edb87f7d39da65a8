"""Independent WebSocket peers (Python `websockets`) for the end-to-end tests.

server PORT   echo server; prints READY. Answers the text "whoami" with a JSON
              object naming the subprotocol and extensions it negotiated.
client URL    runs a conversation through the proxy and prints one JSON line
              with what it saw.
"""
import asyncio
import json
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


async def server(port):
    async with serve(echo, "127.0.0.1", port, subprotocols=["chat", "superchat"],
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


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server(int(sys.argv[2])))
    else:
        asyncio.run(client(sys.argv[2]))
