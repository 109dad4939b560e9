"""One writer at a time per OUT: a lease with expiry and a fencing token, on local disks and object stores.

Two runs into one OUT (a user's rerun while the nightly job runs, two timepoints submitted together)
would both read the plate's layout, extend it and write it back, and both take the same next t index.
So a run holds a lease on OUT for as long as it writes: ``OUT/.lease/<token>.json``, where the token
is one more than the highest present. A token file is created exclusively (``O_EXCL`` on a local
disk; a conditional PUT, ``If-None-Match: *``, on an object store), so of two runs reaching for the
same token exactly one gets it, and tokens only grow: the token is the fence. The holder renews its
file's expiry from a background thread; a run that died leaves a lease that expires (at once for a
run on the same host, whose process is visibly gone), and the next run takes the next token. A
holder that finds a higher token than its own (its lease expired while it was stalled, and another
run took over) has lost the lease and stops before writing more.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from livecell_ray.store._files import Outputs, is_local, join

LEASE_DIR = ".lease"


class LeaseBusy(RuntimeError):
    """Another run holds OUT's lease; the message says who, since when, and how to wait for it."""


class LeaseLost(RuntimeError):
    """This run's lease expired and another run took OUT over: it must stop writing."""


@dataclass
class Lease:
    """A held lease: its fencing token, renewed in the background until released."""

    outputs: Outputs
    token: int
    owner: str
    ttl_s: float
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return _token_path(self.outputs, self.token)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run has taken OUT over."""
        if self.lost:
            raise LeaseLost(self.lost)
        top = _highest(self.outputs)
        if top and top[0] > self.token:
            self.lost = (f"{self.outputs.url}: this run's lease (token {self.token}) expired and run "
                         f"{_who(top[1])} took OUT over (token {top[0]}); stopping without writing more")
            raise LeaseLost(self.lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.check()
                _write(self.outputs, self.path, _record(self.owner, self.token, self.ttl_s), create=False)
            except LeaseLost:
                return
            except Exception:  # a transient store error: the next renewal retries well before expiry
                continue

    def release(self) -> None:
        """Stop renewing and mark the lease free (expired now), so a waiting run starts at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
        if not self.lost:
            try:
                _write(self.outputs, self.path, {**_record(self.owner, self.token, 0.0), "released": True},
                       create=False)
            except Exception:
                pass  # it expires by itself


def acquire(outputs: Outputs, ttl_s: float = 120.0, wait: bool = False, poll_s: float = 2.0,
            on_wait: Any = None) -> Lease:
    """Take OUT's lease (waiting for it with ``wait``, else raising :class:`LeaseBusy`)."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    told = False
    while True:
        top = _highest(outputs)
        token = (top[0] if top else 0) + 1
        if top and not _free(top[1]):
            if not wait:
                raise LeaseBusy(f"{outputs.url} is being written by run {_who(top[1])} (lease until "
                                f"{time.strftime('%H:%M:%S', time.localtime(top[1]['expires']))}, renewed while it "
                                f"runs); rerun with --wait to start when it ends, or write to another OUT")
            if on_wait and not told:
                on_wait(f"waiting for run {_who(top[1])} to finish writing {outputs.url}")
                told = True
            time.sleep(poll_s)
            continue
        try:
            _write(outputs, _token_path(outputs, token), _record(owner, token, ttl_s), create=True)
        except FileExistsError:
            continue  # another run took this token first: look again
        lease = Lease(outputs, token, owner, ttl_s)
        _clean_old(outputs, token)
        lease._thread = threading.Thread(target=lease._renew_loop, name="livecell-ray-lease", daemon=True)
        lease._thread.start()
        return lease


def _record(owner: str, token: int, ttl_s: float) -> dict[str, Any]:
    host, pid, _ = owner.split(":")
    return {"owner": owner, "host": host, "pid": int(pid), "token": token, "expires": time.time() + ttl_s,
            "renewed": time.time()}


def _who(rec: dict[str, Any]) -> str:
    return f"{rec.get('owner', '?')} (host {rec.get('host', '?')}, pid {rec.get('pid', '?')})"


def _free(rec: dict[str, Any]) -> bool:
    """Released, expired, or held by a process of this host that no longer exists (a killed run: the same
    command run again at once resumes rather than waiting out the lease)."""
    if rec.get("released") or float(rec.get("expires", 0)) < time.time():
        return True
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
        try:
            os.kill(rec["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
    return False


def _token_path(outputs: Outputs, token: int) -> str:
    return join(outputs.root, LEASE_DIR, f"{token:012d}.json")


def _highest(outputs: Outputs) -> tuple[int, dict[str, Any]] | None:
    """The highest token present and its record (a record unreadable for a moment reads as held)."""
    base = join(outputs.root, LEASE_DIR)
    outputs.fs.invalidate_cache()
    try:
        names = [p.rsplit("/", 1)[-1] for p in outputs.fs.ls(base, detail=False)]
    except FileNotFoundError:
        return None
    tokens = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
    if not tokens:
        return None
    try:
        rec = json.loads(outputs.fs.cat_file(_token_path(outputs, tokens[-1])))
    except (FileNotFoundError, ValueError):
        rec = {"owner": "?", "expires": time.time() + 1.0}  # being written: look again shortly
    return tokens[-1], rec


def _write(outputs: Outputs, path: str, rec: dict[str, Any], create: bool) -> None:
    """Write a lease record; with ``create``, only if the file does not exist (FileExistsError otherwise)."""
    data = json.dumps(rec).encode()
    if is_local(outputs.url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if create:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        outputs.write_bytes(path, data)
        return
    if not create:
        outputs.fs.pipe_file(path, data)
        return
    try:
        outputs.fs.pipe_file(path, data, mode="create")  # a conditional PUT (If-None-Match: *)
    except FileExistsError:
        raise
    except Exception as exc:  # s3fs reports a failed precondition as an OSError/ClientError with 412
        if "412" in str(exc) or "PreconditionFailed" in str(exc) or "precondition" in str(exc).lower():
            raise FileExistsError(path) from exc
        raise


def _clean_old(outputs: Outputs, token: int) -> None:
    """Remove token files well below the current one (never the one just below: a loser may still read it)."""
    base = join(outputs.root, LEASE_DIR)
    try:
        names = [p.rsplit("/", 1)[-1] for p in outputs.fs.ls(base, detail=False)]
        old = [join(base, n) for n in names if n.endswith(".json") and n[:-5].isdigit() and int(n[:-5]) < token - 1]
        if old:
            outputs.remove_many(old)
    except Exception:
        pass
