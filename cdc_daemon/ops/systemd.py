"""systemd's notify protocol (``Type=notify``): READY=1 once startup checks pass, WATCHDOG=1
while the loops make progress, STOPPING=1 when a shutdown starts.

The datagrams are sent by ``sdnotify``. systemd hands its settings over in the environment
(NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID): they belong to the service manager's protocol,
not to the daemon's configuration, so they are read here rather than in ``config``. Outside
systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os

import sdnotify


class SystemdNotifier:
    def __init__(self) -> None:
        self._notifier: sdnotify.SystemdNotifier | None = None
        self.watchdog_s: float | None = None
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        # Connects the datagram socket (and swallows errors, like sd_notify(3): a service
        # manager that went away must not stop the daemon).
        self._notifier = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        # sd_watchdog_enabled(3): the watchdog is meant for this process only if the pid
        # matches (or none is given).
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def _send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self._send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        notifier, self._notifier = self._notifier, None
        sock = getattr(notifier, "socket", None)
        if sock is not None:
            sock.close()
