"""Ghost identities: what one costs to create, and what the bridge's memory does with many.

Runs the real bridge against the benchmark stack and sends one mail from each of N different
addresses, so the bridge creates N ghost identities (device, Olm account, cross-signing keys).
Prints the time per new identity and the bridge process's RSS before and after (target: under
150 MB with 1,000 ghosts; only the most recently used identities stay loaded).

    .venv/bin/python -m bench.ghosts -n 1000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from nio import AsyncClient

from tests.harness import accept_invite

from .inbound import _smtp_worker
from .proc import load, rss
from .setup import BenchEnv, start_env


async def _delivered(log: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if delivered_count(log) >= count:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"fewer than {count} deliveries after {timeout} s")


def delivered_count(log: Path) -> int:
    return log.read_text(errors="replace").count("Delivered ")


async def mail_from_each(env: BenchEnv, to: str, senders: list[str], timeout: float) -> float:
    """One mail from each sender (4 connections at a time) to `to`, until all are delivered;
    returns the seconds it took."""
    log = env.env.bridge.log_path
    before = delivered_count(log)
    start = time.perf_counter()
    await asyncio.gather(*(
        asyncio.to_thread(
            lambda c=chunk: [_smtp_worker(env.smtp_port, to, [f"hi {s}"], {}, s) for s in c]
        )
        for chunk in (senders[i::4] for i in range(4))
    ))
    await _delivered(log, before + len(senders), timeout)
    return time.perf_counter() - start


async def run(env: BenchEnv, alice: AsyncClient, n: int, second: AsyncClient | None = None,
              prefix: str = "ghost") -> dict:
    """n mails from n new addresses to alice: n ghosts and n portals. With `second`, the same
    n addresses then write to a second user: n more portals and no new ghost."""
    pid = env.env.bridge.process.pid
    to = env.mailbox(alice)
    await asyncio.to_thread(_smtp_worker, env.smtp_port, to, [f"warm {prefix}"], {},
                            f"{prefix}-warm@example.org")
    await accept_invite(alice, inviter_prefix=None)
    await _delivered(env.env.bridge.log_path, 1, 60)
    out: dict = {"n": n, "rss_before": rss(pid), "load_before": load()}
    senders = [f"{prefix}{i}@example.org" for i in range(n)]
    out["ghost_seconds"] = await mail_from_each(env, to, senders, 60 + n * 2)
    out["rss_after_ghosts"] = rss(pid)
    out["load_ghosts"] = load()
    if second is not None:
        out["portal_seconds"] = await mail_from_each(env, env.mailbox(second), senders,
                                                     60 + n * 2)
        out["rss_after_portals"] = rss(pid)
        out["load_portals"] = load()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="number of ghosts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloakroom-bench-") as tmp:
        env = await start_env(Path(tmp))
        try:
            alice = await env.user("alice")
            r = await run(env, alice, args.n)
        finally:
            await env.close()
    mb = 1024 * 1024
    print(f"\nGhost identities, N={args.n}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| mail from a new address → posted by a new, cross-signed ghost | "
          f"{r['ghost_seconds'] / args.n * 1000:.0f} ms each |")
    print(f"| bridge RSS before | {r['rss_before'] / mb:.0f} MB |")
    print(f"| bridge RSS after {args.n} ghosts (target < 150 MB) | "
          f"{r['rss_after_ghosts'] / mb:.0f} MB |")
    print(f"| memory per ghost (incl. its portal) | "
          f"{(r['rss_after_ghosts'] - r['rss_before']) / 1024 / args.n:.0f} KB |")


if __name__ == "__main__":
    asyncio.run(main())
