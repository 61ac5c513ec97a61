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

from tests.harness import accept_invite

from .inbound import _smtp_worker
from .setup import start_env


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _delivered(log: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count("Delivered ") >= count:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"fewer than {count} deliveries after {timeout} s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="number of ghosts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloakroom-bench-") as tmp:
        env = await start_env(Path(tmp))
        try:
            alice = await env.user("alice")
            to = env.mailbox(alice)
            pid = env.env.bridge.process.pid
            await asyncio.to_thread(_smtp_worker, env.smtp_port, to, ["warm"], {},
                                    "warm@example.org")
            await accept_invite(alice)
            log = env.env.bridge.log_path
            await _delivered(log, 1, 60)
            before = _rss_mb(pid)
            start = time.perf_counter()
            senders = [f"ghost{i}@example.org" for i in range(args.n)]
            await asyncio.gather(*(
                asyncio.to_thread(
                    lambda c=chunk: [_smtp_worker(env.smtp_port, to, [f"hi {s}"], {}, s) for s in c]
                )
                for chunk in (senders[i::4] for i in range(4))
            ))
            await _delivered(log, 1 + args.n, 60 + args.n * 2)
            elapsed = time.perf_counter() - start
            after = _rss_mb(pid)
        finally:
            await env.close()
    print(f"\nGhost identities, N={args.n}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| mail from a new address → posted by a new, cross-signed ghost | "
          f"{elapsed / args.n * 1000:.0f} ms each |")
    print(f"| bridge RSS before | {before:.0f} MB |")
    print(f"| bridge RSS after {args.n} ghosts (target < 150 MB) | {after:.0f} MB |")
    print(f"| memory per ghost (incl. its portal) | {(after - before) * 1024 / args.n:.0f} KB |")


if __name__ == "__main__":
    asyncio.run(main())
