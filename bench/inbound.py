"""Inbound throughput: does the bridge keep up with the homeserver?

N mails over k SMTP connections into the real bridge, timed until a matrix-nio client has all of
them decrypted; against a baseline in the same run: the same N events as raw `PUT /send` of
same-size `m.room.encrypted` payloads by k concurrent senders into a room on the same Synapse,
timed until the same client has received them. Prints both rates, their ratio (target ≥ 0.8),
the bridge's p50/p99 latency from end of DATA to decryptable event, and the bridge process's own
CPU time (user + system) per mail (target ≤ 3 ms).

    make bench                         # (bench.report) N=500, k=4
    .venv/bin/python -m bench.inbound -n 200 -k 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from nio import AsyncClient, MegolmEvent, RoomMessageText, SyncResponse

from tests.harness import ENCRYPTION_STATE, accept_invite
from tests.mail import make_mail

from .proc import cpu_seconds
from .setup import BenchEnv, start_env


async def _watch(client: AsyncClient, seen: dict[str, float], want: int, key) -> None:
    """Sync until `want` distinct keys were seen; record when each first appeared."""
    while len(seen) < want:
        resp = await client.sync(timeout=1000)
        if not isinstance(resp, SyncResponse):
            continue
        now = time.perf_counter()
        for room in resp.rooms.join.values():
            for event in room.timeline.events:
                k = key(event)
                if k and k not in seen:
                    seen[k] = now


def _smtp_worker(
    port: int, to: str, tokens: list[str], sent: dict[str, float], sender: str = "bob@example.org"
) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for token in tokens:
            msg = make_mail(to=to, sender=sender, subject=token, text=f"{token} " + "x" * 400)
            smtp.sendmail(sender, [to], msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
            sent[token] = time.perf_counter()


async def warm_up(env: BenchEnv, alice: AsyncClient, k: int) -> list[str]:
    """The k portal rooms (sender0..k-1 → alice) exist and are joined; returns their IDs."""
    to = env.mailbox(alice)
    rooms = []
    for i in range(k):
        await asyncio.to_thread(
            _smtp_worker, env.smtp_port, to, [f"warmup-{i}"], {}, f"sender{i}@example.org"
        )
        rooms.append(await accept_invite(alice))
    return rooms


def token_key(wanted: set[str]):
    """The key function for _watch: the token a decrypted bridged mail starts its last line with."""
    def key(event) -> str | None:
        if isinstance(event, RoomMessageText) and event.decrypted and event.body:
            first = event.body.splitlines()[-1].split(" ", 1)[0]
            return first if first in wanted else None
        return None
    return key


async def bridge_run(
    env: BenchEnv, alice: AsyncClient, n: int, k: int, warm: bool = True
) -> tuple[float, list, float]:
    """(mails/s, latencies in s, the bridge's CPU seconds) for n mails over k connections."""
    to = env.mailbox(alice)
    if warm:
        await warm_up(env, alice, k)
    tokens = [f"bench-{i}-{secrets.token_hex(3)}" for i in range(n)]
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    watcher = asyncio.create_task(_watch(alice, seen, n, token_key(set(tokens))))
    pid = env.env.bridge.process.pid
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    # k correspondents, one SMTP connection each: k conversations, like k senders below.
    chunks = [tokens[i::k] for i in range(k)]
    await asyncio.gather(*(
        asyncio.to_thread(_smtp_worker, env.smtp_port, to, c, sent, f"sender{i}@example.org")
        for i, c in enumerate(chunks)
    ))
    await asyncio.wait_for(watcher, 120 + n)
    elapsed = max(seen.values()) - start
    cpu = cpu_seconds(pid) - cpu_before
    latencies = [seen[t] - sent[t] for t in tokens]
    return n / elapsed, latencies, cpu


async def baseline_rooms(
    env: BenchEnv, alice: AsyncClient, k: int
) -> list[tuple[AsyncClient, str]]:
    """k senders, each with an encrypted room alice has joined."""
    out = []
    for i in range(k):
        sender = await env.user(f"baseline{i}")
        resp = await sender.room_create(invite=[alice.user_id], initial_state=[ENCRYPTION_STATE])
        await accept_invite(alice)
        out.append((sender, resp.room_id))
    return out


def encrypted_content(tag: str, payload: str) -> dict:
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "A" * 43,
        "device_id": "BASELINE",
        "session_id": tag,
        "ciphertext": payload,
    }


def session_key(prefix: str):
    """The key function for _watch: the session_id of a baseline event (never decrypted)."""
    def key(event) -> str | None:
        if isinstance(event, MegolmEvent) and event.session_id.startswith(prefix):
            return event.session_id
        return None
    return key


async def baseline_run(env: BenchEnv, alice: AsyncClient, n: int, k: int, size: int,
                       rooms: list[tuple[AsyncClient, str]] | None = None) -> float:
    pairs = rooms or await baseline_rooms(env, alice, k)
    senders = [s for s, _ in pairs]
    rooms_ = [r for _, r in pairs]
    payload = base64.b64encode(os.urandom(size)).decode()
    seen: dict[str, float] = {}
    watcher = asyncio.create_task(_watch(alice, seen, n, session_key("base-")))

    async def worker(j: int, session: aiohttp.ClientSession) -> None:
        url = f"{env.synapse.url}/_matrix/client/v3/rooms/{rooms_[j]}/send/m.room.encrypted"
        headers = {"Authorization": f"Bearer {senders[j].access_token}"}
        for i in range(j, n, k):
            content = encrypted_content(f"base-{i}", payload)
            async with session.put(f"{url}/base{i}", json=content, headers=headers) as r:
                r.raise_for_status()

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(j, session) for j in range(k)))
    await asyncio.wait_for(watcher, 120 + n)
    return n / (max(seen.values()) - start)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=500, help="number of mails")
    parser.add_argument("-k", type=int, default=4, help="concurrent SMTP connections / senders")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloakroom-bench-") as tmp:
        env = await start_env(Path(tmp))
        try:
            alice = await env.user("alice")
            bridge_rate, latencies, cpu = await bridge_run(env, alice, args.n, args.k)
            # Same size as what the bridge posts: a Megolm ciphertext of a ~500-byte message.
            base_rate = await baseline_run(env, alice, args.n, args.k, size=560)
        finally:
            await env.close()
    ratio = bridge_rate / base_rate
    print(f"\nInbound, N={args.n}, k={args.k}")
    print("| path | events/s |")
    print("|---|---|")
    print(f"| bridge: SMTP → decrypted in nio | {bridge_rate:.1f} |")
    print(f"| baseline: raw PUT /send → received in nio | {base_rate:.1f} |")
    print(f"| ratio (target ≥ 0.8) | {ratio:.2f} |")
    print(f"Latency DATA end → decryptable: p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.0f} ms")
    print(f"Bridge CPU (user + system): {cpu / args.n * 1000:.1f} ms per mail (target ≤ 3)")


if __name__ == "__main__":
    asyncio.run(main())
