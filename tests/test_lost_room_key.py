"""A reply written while the bridge was down is still mailed, with Element's crypto stack.

Synapse keeps the events of transactions it could not deliver, but drops the to-device messages
that rode along, the room key among them. The bridge asks the writer's devices for the key, and
Element forwards it to a device it had shared the session with.
"""

from __future__ import annotations

import asyncio
import signal

from .element_client import ElementDevices
from .harness import Env
from .mail import unique
from .test_every_device import local, mail
from .test_every_device_element import reads


async def test_a_reply_written_while_the_bridge_was_down_is_mailed(
    running: Env, element: ElementDevices
) -> None:
    user_id, password = await running.register()
    laptop = await element.login(user_id, password, "laptop")
    token = unique("first")
    correspondent = f"{unique('lost')}@example.org"
    await mail(running, f"{local(user_id)}@localhost", token,
               sender=f"Lost Key <{correspondent}>")
    room_id = await laptop.accept_invite()
    (first,) = await laptop.wait_for_messages(room_id, reads(token))

    running.bridge.stop(signal.SIGKILL)
    answer = unique("answer")
    try:
        # A new session (the first message of this device in the room): its key goes to the
        # bot's device as a to-device message nobody delivers to the stopped bridge.
        await laptop.send_text(room_id, f"while you were away {answer}")
    finally:
        running.bridge.start()
    (sent,) = await asyncio.to_thread(
        running.relay.wait_for, lambda r: answer.encode() in r.data, 1, 120)
    assert correspondent.encode() in sent.data
    assert len(running.relay.find(lambda r: answer.encode() in r.data)) == 1
