"""Outbound throughput: do answers leave as fast as a client can write them?

N encrypted messages sent by a matrix-nio client in a portal room, timed until the relay has all
N mails; against, in the same run, the same client sending N plain messages to the homeserver in
a room with no bridge in it (timed until the homeserver has accepted the last one). Prints both
rates and the ratio (target ≥ 0.8).

    make bench
    .venv/bin/python -m bench.outbound -n 200
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

from nio import AsyncClient, RoomSendResponse

from tests.harness import accept_invite, wait_for_event

from .inbound import _smtp_worker
from .setup import BenchEnv, start_env


async def portal(env: BenchEnv, alice: AsyncClient) -> str:
    """A conversation room with bob@example.org, joined by alice."""
    to = env.mailbox(alice)
    await asyncio.to_thread(_smtp_worker, env.smtp_port, to, ["hello"], {})
    room_id = await accept_invite(alice)
    await wait_for_event(alice, room_id, lambda e: "hello" in getattr(e, "body", ""))
    return room_id


async def run(env: BenchEnv, alice: AsyncClient, room_id: str, n: int) -> tuple[float, float]:
    """(bridge messages/s, baseline messages/s) for n messages."""
    tag = f"out-{secrets.token_hex(3)}"
    relay = env.env.relay
    start = time.perf_counter()
    for i in range(n):
        resp = await alice.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": f"{tag} {i}"},
            ignore_unverified_devices=True,
        )
        assert isinstance(resp, RoomSendResponse), resp
    got = await asyncio.to_thread(relay.wait_for, lambda r: tag.encode() in r.data, n, 600)
    assert len(got) == n, f"only {len(got)} of {n} mails reached the relay"
    bridge_rate = n / (time.perf_counter() - start)

    plain = await alice.room_create(name="no bridge here")
    await alice.sync(timeout=0)
    start = time.perf_counter()
    for i in range(n):
        resp = await alice.room_send(
            plain.room_id, "m.room.message", {"msgtype": "m.text", "body": f"plain {i}"}
        )
        assert isinstance(resp, RoomSendResponse), resp
    return bridge_rate, n / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=300, help="number of messages")
    args = parser.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory(prefix="cloakroom-bench-") as tmp:
        env = await start_env(Path(tmp))
        try:
            alice = await env.user("alice")
            bridge_rate, base_rate = await run(env, alice, await portal(env, alice), n)
        finally:
            await env.close()
    print(f"\nOutbound, N={n}")
    print("| path | messages/s |")
    print("|---|---|")
    print(f"| bridge: encrypted message in Element → mail at the relay | {bridge_rate:.1f} |")
    print(f"| baseline: plain message → accepted by the homeserver | {base_rate:.1f} |")
    print(f"| ratio (target ≥ 0.8) | {bridge_rate / base_rate:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
