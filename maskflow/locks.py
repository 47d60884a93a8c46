"""A lock with an expiry on object storage: one object whose creation is atomic (local ``O_EXCL``, S3's conditional
PUT), holding who took it and until when.

Retraining takes one per model so that two runs at once cannot both promote: the second finds the lock held and
stops, saying by whom and until when. A holder that dies leaves the lock to expire (``ttl_s``); the next run breaks
an expired lock and takes it, or at once when the holder was a process on the same host that no longer exists. The holder renews it at every step and checks it is still its own before acting on it
(:meth:`Lease.verify`): a holder that overran its expiry and lost the lock to another run does not promote.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from maskflow import storage
from maskflow.storage import DEFAULT_OPTIONS, StorageOptions

log = logging.getLogger(__name__)

__all__ = ["Lease", "LockHeld", "LockLost"]


class LockHeld(RuntimeError):
    """Another holder has the lock and it has not expired."""


class LockLost(RuntimeError):
    """The lock this holder took is no longer its own (expired and taken, or removed)."""


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (a killed run): its lock need not wait for expiry."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Lease:
    """The lock object at ``uri`` (e.g. ``<workdir>/retrain.lock``), valid ``ttl_s`` seconds after each
    :meth:`acquire` / :meth:`renew`. ``what`` names the locked thing in messages."""

    def __init__(self, uri: str, ttl_s: float, what: str, options: StorageOptions = DEFAULT_OPTIONS):
        self.uri, self.ttl_s, self.what, self.options = uri, float(ttl_s), what, options
        self.owner = uuid.uuid4().hex
        self.held = False
        self.acquired: float | None = None  # when this holder took it (kept across renewals)

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired": self.acquired or now, "expires": now + self.ttl_s, "what": self.what}).encode()

    def read(self) -> dict | None:
        """The lock's content, or None when there is no lock."""
        try:
            return json.loads(storage.read_bytes(self.uri, self.options))
        except FileNotFoundError:
            return None
        except Exception as e:  # a lock object cut short by a crash mid-write: unreadable
            if storage.exists(self.uri, self.options):
                log.warning("lock %s is unreadable (%s): treating it as expired", self.uri, type(e).__name__)
                return {"expires": 0, "owner": "?", "host": "?", "pid": "?"}
            return None

    def acquire(self) -> None:
        """Take the lock, breaking it if it has expired; :class:`LockHeld` (one line: by whom, until when) if not."""
        for _ in range(3):
            self.acquired = time.time()
            if storage.create_exclusive(self.uri, self._body(), self.options):
                self.held = True
                return
            current = self.read()
            if current is None:
                continue  # released between our create and our read: try again
            if current.get("expires", 0) > time.time() and not _dead_here(current):
                raise LockHeld(f"{self.what} is locked by {current.get('host')} pid {current.get('pid')} since "
                               f"{_when(current.get('acquired', 0))}, until {_when(current['expires'])} "
                               f"({self.uri}): wait for that run, or delete the lock if it is known dead")
            log.warning("taking over the lock on %s from %s pid %s (%s)", self.what, current.get("host"),
                        current.get("pid"), "that process is gone" if _dead_here(current)
                        else f"expired {_when(current.get('expires', 0))}")
            if self.read() == current:  # still the expired one (another run may have broken it and taken it)
                storage.delete(self.uri, self.options)
        raise LockHeld(f"{self.what}: could not take the lock at {self.uri} (contended): try again")

    def verify(self) -> None:
        """:class:`LockLost` unless the lock is still this holder's and unexpired."""
        current = self.read()
        if not self.held or current is None or current.get("owner") != self.owner:
            raise LockLost(f"{self.what}: this run no longer holds the lock {self.uri} (it expired and another run "
                           "took it, or it was removed): not acting on it")
        if current.get("expires", 0) <= time.time():
            raise LockLost(f"{self.what}: this run's lock expired at {_when(current['expires'])}; raise lock_ttl_s")

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead (after :meth:`verify`)."""
        self.verify()
        storage.write_bytes(self.uri, self._body(), self.options)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        current = self.read()
        if current is not None and current.get("owner") == self.owner:
            storage.delete(self.uri, self.options)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
