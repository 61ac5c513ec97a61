"""The benchmark stack: the same DNS + Synapse + bridge the integration tests run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from nio import AsyncClient

from tests.harness import Env
from tests.stack import start_stack, stop_stack


@dataclass
class BenchEnv:
    env: Env

    @property
    def synapse(self):  # noqa: ANN201
        return self.env.synapse

    @property
    def smtp_port(self) -> int:
        return self.env.smtp_port

    def mailbox(self, client: AsyncClient) -> str:
        return f"{client.user_id[1:].split(':')[0]}@localhost"

    async def user(self, name: str) -> AsyncClient:
        return await self.env.new_user(name)

    async def close(self) -> None:
        await self.env.close()
        await asyncio.to_thread(stop_stack, self.env)


async def start_env(base: Path, more: dict | None = None) -> BenchEnv:
    # Benchmarks measure throughput, not the flood limits tests check.
    extra = {
        "email.rate_limit.per_sender_per_hour": 1_000_000,
        "email.rate_limit.per_recipient_per_hour": 1_000_000,
        "email.outbound.rate_limit": 1_000_000,
        "logging.loggers.bridge.level": "INFO",
        **(more or {}),
    }
    env = await asyncio.to_thread(start_stack, base, extra)
    await asyncio.to_thread(env.bridge.start)
    return BenchEnv(env)
