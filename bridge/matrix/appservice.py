"""The appservice HTTP endpoint: authenticated, replay-safe transactions in.

mautrix's AppService does the parsing; this subclass tightens what it accepts:

* the hs_token is compared in constant time; a missing token is 401 ``M_UNAUTHORIZED`` and a wrong
  one 403 ``M_FORBIDDEN``, as the spec asks, and nothing in such a request is looked at;
* finished transaction ids are stored in the database, so a transaction replayed after a restart
  is acknowledged without being processed twice;
* transactions wait until the bridge has finished starting (crypto ready) instead of being
  handled half-initialised; Synapse simply sees a slower answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from aiohttp import web
from mautrix.appservice import AppService

from ..db import TxnLog


def _error(status: type[web.HTTPException], errcode: str, message: str) -> web.HTTPException:
    return status(
        content_type="application/json", text=json.dumps({"errcode": errcode, "error": message})
    )


class BridgeAppService(AppService):
    def __init__(self, *args: Any, txn_log: TxnLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.txn_log = txn_log
        self.started = asyncio.Event()
        # Run the state-store update and our dispatcher in order, per transaction; the
        # dispatcher hands slow work to per-room queues itself (see matrix.handler).
        self.synchronous_handlers = True
        self._txn_lock = asyncio.Lock()
        self.runner: web.AppRunner | None = None

    async def stop_server(self) -> None:
        """Stop taking transactions; HTTP to the homeserver keeps working until stop()."""
        self.ready = False
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    def _token_of(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header.removeprefix("Bearer ")
        return request.rel_url.query.get("access_token")

    def _authenticate(self, request: web.Request) -> None:
        token = self._token_of(request)
        if token is None:
            raise _error(web.HTTPUnauthorized, "M_UNAUTHORIZED", "Missing access token")
        if not hmac.compare_digest(token.encode(), self.hs_token.encode()):
            raise _error(web.HTTPForbidden, "M_FORBIDDEN", "Invalid access token")

    def _check_token(self, request: web.Request) -> bool:
        # Used by mautrix for the user/alias query and ping endpoints.
        token = self._token_of(request)
        return token is not None and hmac.compare_digest(token.encode(), self.hs_token.encode())

    async def _read_transaction_header(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        self._authenticate(request)
        transaction_id = request.match_info["transaction_id"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _error(web.HTTPBadRequest, "M_NOT_JSON", "Body is not JSON") from None
        if not isinstance(body, dict):
            raise _error(web.HTTPBadRequest, "M_BAD_JSON", "Body is not a JSON object")
        await self.started.wait()
        if transaction_id in self.transactions or await self.txn_log.seen(transaction_id):
            raise web.HTTPOk(content_type="application/json", text="{}")
        return transaction_id, body

    async def _http_handle_transaction(self, request: web.Request) -> web.Response:
        # One transaction at a time: Synapse sends them in order and waits for each, and the
        # lock makes the replay check and the mark below atomic if one is retried concurrently.
        async with self._txn_lock:
            response = await super()._http_handle_transaction(request)
            await self.txn_log.mark(request.match_info["transaction_id"])
            return response
