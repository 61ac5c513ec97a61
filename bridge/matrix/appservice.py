"""The appservice HTTP endpoint: authenticated, replay-safe transactions in.

mautrix's AppService does the parsing; this subclass tightens what it accepts:

* the hs_token is compared in constant time; a missing token is 401 ``M_UNAUTHORIZED`` and a wrong
  one 403 ``M_FORBIDDEN``, as the spec asks, and nothing in such a request is looked at;
* finished transaction ids are stored in the database, so a transaction replayed after a restart
  is acknowledged without being processed twice;
* transactions wait until the bridge has finished starting (crypto ready) instead of being
  handled half-initialised; Synapse simply sees a slower answer;
* bodies up to MAX_TRANSACTION_BYTES are taken (aiohttp's default of 1 MiB would answer 413 to
  a full transaction, and Synapse would retry it forever);
* every event of a transaction gets its turn: a handler that crashes on one event is logged with
  the event's ID and the others are still handled. A handler that could not *record* an event
  it must not lose raises :class:`MustRetry`: the transaction is then answered 500, not marked,
  and Synapse sends it again;
* work that must only start once the transaction is recorded as done waits for
  ``current_transaction().done`` (set after the mark, see matrix.inbox).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from mautrix.appservice import AppService
from mautrix.types import Event, EventType

from ..db import TxnLog
from ..metrics import observe_transaction

# Synapse sends up to 100 PDUs and 100 EDUs plus to-device messages per transaction; a single
# PDU may be 64 KiB. Generous, and still a bound.
MAX_TRANSACTION_BYTES = 64 * 1024 * 1024

log = logging.getLogger("bridge.as.txn")


class MustRetry(Exception):
    """Raised by an event handler that could not record an event it must not lose."""


@dataclass
class IncomingTransaction:
    """The transaction being handled; `done` is set once it is recorded as processed."""

    txn_id: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    must_retry: bool = False


_current: contextvars.ContextVar[IncomingTransaction | None] = contextvars.ContextVar(
    "cloakroom_transaction", default=None
)


# Where a transaction's body digest travels from the header check to the mark.
DIGEST_KEY = web.RequestKey("cloakroom_digest", str)


def current_transaction() -> IncomingTransaction | None:
    """The transaction whose events are being dispatched (None outside a transaction)."""
    return _current.get()


def _error(status: type[web.HTTPException], errcode: str, message: str) -> web.HTTPException:
    return status(
        content_type="application/json", text=json.dumps({"errcode": errcode, "error": message})
    )


class BridgeAppService(AppService):
    def __init__(self, *args: Any, txn_log: TxnLog, **kwargs: Any) -> None:
        aiohttp_params = dict(kwargs.pop("aiohttp_params", None) or {})
        aiohttp_params.setdefault("client_max_size", MAX_TRANSACTION_BYTES)
        super().__init__(*args, aiohttp_params=aiohttp_params, **kwargs)
        self.txn_log = txn_log
        self.started = asyncio.Event()
        # Run the state-store update and our dispatcher in order, per transaction; the
        # dispatcher hands slow work to per-room queues itself (see matrix.handler).
        self.synchronous_handlers = True
        self._txn_lock = asyncio.Lock()
        # (id, body digest) of transactions handled by this process (the log has them all).
        self._handled: set[tuple[str, str]] = set()
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
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _error(web.HTTPBadRequest, "M_NOT_JSON", "Body is not JSON") from None
        if not isinstance(body, dict):
            raise _error(web.HTTPBadRequest, "M_BAD_JSON", "Body is not a JSON object")
        # A transaction is its id *and* its content: Synapse reuses ids after it crashed before
        # saving its counter, and such a "replay" carries new events that must not be dropped.
        # (Its own retries resend the same content; events seen twice anyway are handled once,
        # see matrix/inbox.py.)
        digest = hashlib.sha256(raw).hexdigest()
        request[DIGEST_KEY] = digest
        await self.started.wait()
        if (transaction_id, digest) in self._handled or await self.txn_log.seen(
            transaction_id, digest
        ):
            raise web.HTTPOk(content_type="application/json", text="{}")
        return transaction_id, body

    @observe_transaction
    async def _http_handle_transaction(self, request: web.Request) -> web.Response:
        # One transaction at a time: Synapse sends them in order and waits for each, and the
        # lock makes the replay check and the mark below atomic if one is retried concurrently.
        async with self._txn_lock:
            txn = IncomingTransaction(request.match_info["transaction_id"])
            token = _current.set(txn)
            try:
                response = await super()._http_handle_transaction(request)
                if txn.must_retry:
                    # mautrix remembers it in memory; it must be handled again when resent.
                    self.transactions.discard(txn.txn_id)
                    raise _error(
                        web.HTTPInternalServerError, "M_UNKNOWN", "Could not record every event"
                    )
                digest = request.get(DIGEST_KEY, "")
                await self.txn_log.mark(txn.txn_id, digest)
                self._handled.add((txn.txn_id, digest))
                return response
            finally:
                _current.reset(token)
                txn.done.set()

    async def handle_matrix_event(self, event: Event, ephemeral: bool = False) -> None:
        """Like mautrix's, but one event's crash never ends the transaction's other events."""
        if ephemeral:
            event.type = event.type.with_class(EventType.Class.EPHEMERAL)
        elif getattr(event, "state_key", None) is not None:
            event.type = event.type.with_class(EventType.Class.STATE)
        else:
            event.type = event.type.with_class(EventType.Class.MESSAGE)
        for handler in self.event_handlers:
            try:
                await handler(event)
            except MustRetry:
                log.exception("Could not record %s; the transaction will be retried", _name(event))
                txn = _current.get()
                if txn is not None:
                    txn.must_retry = True
            except Exception:
                log.exception("Failed to handle %s", _name(event))


def _name(event: Event) -> str:
    event_id = getattr(event, "event_id", None) or "an ephemeral event"
    return f"{event_id} ({event.type}) in {getattr(event, 'room_id', None)}"
