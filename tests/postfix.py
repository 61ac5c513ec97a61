"""A throwaway Postfix for the tests: its own configuration directory, queue and log file.

Its main.cf and master.cf are deploy/postfix-main.cf and deploy/postfix-master.cf with the
example names and ports replaced, on top of the few settings a second instance needs (its own
queue_directory and data_directory, loopback only, a log file since there is no syslog). So the
deployment excerpts are what the tests run. Postfix's master must start as root; the tests skip
(with :func:`unavailable`'s reason) when it cannot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).parent.parent / "deploy"
SBIN = Path("/usr/sbin")

# Every service a Postfix instance needs, as upstream's master.cf has them (without its
# "smtp inet" line, which comes from deploy/postfix-master.cf), chroot off everywhere.
BASE_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# A second LMTP transport whose mail waits until `postqueue -f` (defer_transports): the tests
# route one mailbox through it to have mail sit in Postfix's queue at a moment they choose.
HELD_TRANSPORT = "lmtpheld"


def postfix_bin() -> Path | None:
    found = shutil.which("postfix")
    if found:
        return Path(found)
    return SBIN / "postfix" if (SBIN / "postfix").exists() else None


def unavailable() -> str | None:
    """Why no Postfix can be run here, or None."""
    if postfix_bin() is None:
        return "Postfix is not installed (scripts/system-deps.sh as root installs it)"
    if os.geteuid() != 0:
        return "Postfix's master process must be started as root"
    return None


@dataclass
class Ports:
    smtpd: int  # the "port 25" of deploy/postfix-master.cf
    submission: int  # where the bridge relays to (10587 in the deploy files)
    lmtp: int  # the bridge's email.listen.port (10025)
    policy: int  # the bridge's email.policy.listen.port (10031)
    sink: int  # relayhost: where Postfix delivers outgoing mail


@dataclass
class Postfix:
    ports: Ports
    domain: str  # the bridge's email.domain
    hostname: str = "mx.cloakroom.test"
    held: list[str] = field(default_factory=list)  # recipients routed through HELD_TRANSPORT
    sink: Any = None  # what listens on ports.sink (tests.relay.TestRelay), for the tests
    base: Path = field(init=False)

    def __post_init__(self) -> None:
        # Not under pytest's tmp dir: its parents are 0700, and Postfix's daemons run as the
        # postfix user, who must reach the queue directory.
        self.base = Path(tempfile.mkdtemp(prefix="cloakroom-postfix-"))
        self.base.chmod(0o755)

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def main_cf(self) -> str:
        held = ", ".join(f"{r}={HELD_TRANSPORT}:inet:127.0.0.1:{self.ports.lmtp}"
                         for r in self.held)
        instance = f"""\
# A throwaway instance (tests/postfix.py): its own queue, loopback only, no local delivery.
compatibility_level = 3.6
queue_directory = {self.base / "queue"}
data_directory = {self.base / "data"}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = {self.hostname}
mydomain = cloakroom.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
maillog_file = {self.maillog}
# Postfix writes its log only under allowed prefixes (a guard against a mistyped path).
maillog_file_prefixes = {self.base}
biff = no
relayhost = [127.0.0.1]:{self.ports.sink}
# Tests flush the queue themselves; a retry within a second when they don't.
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
defer_transports = {HELD_TRANSPORT}
transport_maps = {"inline:{ " + held + " }" if held else ""}
"""
        return instance + "\n" + self._deployed("postfix-main.cf")

    def master_cf(self) -> str:
        master = self._deployed("postfix-master.cf")
        # The deployed smtpd listens on port 25; this one on a free loopback port.
        master, n = re.subn(r"^smtp(\s+)inet", rf"127.0.0.1:{self.ports.smtpd}\1inet", master,
                            flags=re.M)
        assert n == 1, "deploy/postfix-master.cf has no 'smtp inet' service"
        held = f"{HELD_TRANSPORT} unix  -       -       n       -       -       lmtp\n"
        return BASE_SERVICES + held + "\n" + master

    def _deployed(self, name: str) -> str:
        """A deploy/ file with its example names and ports replaced by this instance's."""
        text = (DEPLOY / name).read_text()
        for old, new in (
            ("mx.example.com", self.hostname),
            (r"mx\.example\.com", re.escape(self.hostname)),
            ("example.com", self.domain),
            ("127.0.0.1:10025", f"127.0.0.1:{self.ports.lmtp}"),
            ("127.0.0.1:10031", f"127.0.0.1:{self.ports.policy}"),
            ("127.0.0.1:10587", f"127.0.0.1:{self.ports.submission}"),
        ):
            text = text.replace(old, new)
        return text

    def start(self) -> Postfix:
        self.config_dir.mkdir()
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        for directory in ("queue", "data"):
            (self.base / directory).mkdir(mode=0o755)
        shutil.chown(self.base / "data", "postfix")
        self.maillog.touch()
        # `postfix start` creates the queue's subdirectories (post-install) and checks the set-up.
        self.run("postfix", "start")
        self.wait_for(lambda: self._listening(), "the smtpd port accepting connections")
        return self

    def stop(self) -> None:
        pid = self._master_pid()
        if pid is not None:
            subprocess.run([str(SBIN / "postfix"), "-c", str(self.config_dir), "stop"],
                           capture_output=True)
            # `postfix stop` only signals the master: wait until it (and so its daemons) exited.
            self.wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the master to exit",
                          timeout=20, fail=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def _master_pid(self) -> int | None:
        try:
            return int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def run(self, command: str, *args: str) -> str:
        """A Postfix command against this instance (``postfix``, ``postqueue``, ``postconf``)."""
        proc = subprocess.run([str(SBIN / command), "-c", str(self.config_dir), *args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{command} {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}\n{self.log_tail()}")
        return proc.stdout + proc.stderr

    def flush(self) -> None:
        self.run("postqueue", "-f")

    def queue(self) -> list[dict[str, object]]:
        """The queued messages (``postqueue -j``: one JSON object a message)."""
        out = self.run("postqueue", "-j")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def log_lines(self) -> list[str]:
        return self.maillog.read_text(errors="replace").splitlines()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_lines()[-lines:]) if self.maillog.exists() else ""

    def deliveries(self, recipient: str, status: str) -> list[str]:
        """Log lines of deliveries to ``recipient`` ending in ``status`` (sent, deferred...)."""
        needle = f"to=<{recipient}>"
        return [line for line in self.log_lines()
                if needle in line and f" status={status} " in line]

    def wait_for(self, predicate: Callable[[], object], what: str, timeout: float = 30,
                 fail: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                if fail:
                    raise TimeoutError(f"Postfix: {what} within {timeout} s:\n{self.log_tail()}")
                return
            time.sleep(0.1)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports.smtpd), timeout=1):
                return True
        except OSError:
            return False
