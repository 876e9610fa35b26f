"""A Python client for `editrt serve` (httpx + websockets): one-shot segment, then an interactive drag.

    editrt serve --weights tiny &
    python examples/client.py --image editrt/assets/chelsea.png --point 225,150 --move 40,10 -o moved.png

With a token: `editrt serve --token T` and `--token T` here (or EDITRT_TOKEN in both).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
from pathlib import Path

import httpx
import websockets


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image", required=True)
    p.add_argument("--point", default="225,150", help="X,Y on the subject (image pixels)")
    p.add_argument("--move", default="40,10", help="DX,DY in pixels")
    p.add_argument("--steps", type=int, default=8, help="drag positions to stream")
    p.add_argument("--token", default=os.environ.get("EDITRT_TOKEN"))
    p.add_argument("-o", "--output", default="moved.png")
    args = p.parse_args()
    x, y = (float(v) for v in args.point.split(","))
    dx, dy = (float(v) for v in args.move.split(","))
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    image = Path(args.image).read_bytes()

    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=300) as client:
        # 1. Stateless: the subject mask, uploading the file as multipart (base64 JSON works as well).
        r = await client.post("/v1/segment", files={"image": ("image.png", image, "image/png")},
                              data={"points": json.dumps([[x, y]])})
        if r.status_code != 200:
            raise SystemExit(f"segment: {r.status_code} {r.json()}")  # {"error", "field", "message"}
        Path("mask.png").write_bytes(r.content)
        print(f"segment: mask.png (server {r.headers['x-server-ms']} ms, pipeline {r.headers['x-pipeline-ms']} ms)")

        # 2. A session: open, select, drag over the WebSocket, release.
        session = (await client.post("/v1/sessions", json={"image": base64.b64encode(image).decode()})).json()
        sid = session["id"]
        mask = (await client.post(f"/v1/sessions/{sid}/select", json={"points": [[x, y]]})).json()
        print(f"select: {mask['area']} px in {mask['timing']['server_ms']:.0f} ms")
        ws_url = args.url.replace("http", "ws", 1) + f"/v1/sessions/{sid}/drag"
        async with websockets.connect(ws_url, additional_headers=headers, max_size=1 << 26) as ws:
            for k in range(1, args.steps + 1):  # positions faster than previews: the server keeps the newest
                await ws.send(json.dumps({"type": "drag", "dx": dx * k / args.steps, "dy": dy * k / args.steps,
                                          "seq": k}))
                await asyncio.sleep(0.03)
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "release", "dx": dx, "dy": dy, "seq": args.steps + 1}))
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "error":
                    raise SystemExit(f"{m['field']}: {m['message']}")
                t = m["timing"]
                print(f"{m['type']} #{m['seq']}: server {t['server_ms']:.0f} ms, pipeline {t['pipeline_ms']:.0f} ms, "
                      f"queue {t['queue_ms']:.0f} ms")
                if m["type"] == "final":
                    Path(args.output).write_bytes(base64.b64decode(m["image"]))
                    print(f"final -> {args.output} ({(time.perf_counter() - sent) * 1e3:.0f} ms after release)")
                    break
        await client.delete(f"/v1/sessions/{sid}")


if __name__ == "__main__":
    asyncio.run(main())
