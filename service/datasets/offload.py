"""A big upload's body validated in a child process while it arrives, so that checking it
does not share the API process's GIL with receiving it (and with every other request).

The API's thread reads the body and writes it to the child's stdin (a pipe of 1 MiB); the
child runs :func:`validate_stream` on it and sends back, in frames on its stdout, the
normalized rows (written into the draft here, as they come: nothing goes to local disk), a
request to read back what it wrote (a rewrite of text rows as conversations: the draft's bytes
go to it on a pipe of their own), and last its result or the error it refused the dataset
with. In the same bench a 1 GB upload ran at 1.2-1.3x the rate of validating in a thread of
the API process, where receiving and checking took turns on one GIL, and other requests
meanwhile waited a third as long (bench/README.md, ingest).
Starting the child costs ~0.15 s, so only bodies declaring :data:`MIN_BYTES` or more come here.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
from typing import IO, BinaryIO, Literal

import msgspec

from service.blobs import Draft
from service.contract import Container, FieldMapping, OnInvalid
from service.datasets.collect import IngestResult, InvalidDataset, Limits, RowError
from service.datasets.containers import DatasetTooLarge, UnsupportedFile, module_command
from service.datasets.output import reread, restart
from service.datasets.validate import validate_stream

MIN_BYTES = 32 * 1024 * 1024
"""Smallest declared body validated in a child process (smaller ones: in a thread)."""
PIPE_BYTES = 1 << 20
"""Pipe buffers asked for (Linux's default maximum): 16x the default, fewer wake-ups."""
CHUNK = 1 << 20

_HEADER = struct.Struct("!cI")
_DATA, _REREAD, _RESTART, _RESULT, _FAILED = b"D", b"R", b"S", b"K", b"E"


def worth_a_child(declared: int | None) -> bool:
    """Whether a body of ``declared`` bytes (its Content-Length) is validated in a child."""
    return declared is not None and declared >= MIN_BYTES


class _Options(msgspec.Struct, frozen=True):
    hint: Container | None
    mapping: FieldMapping | None
    limits: Limits
    on_invalid: OnInvalid
    max_invalid_fraction: float
    reread_fd: int


class _Failure(msgspec.Struct, frozen=True):
    """A refusal, carried across as what the API answers it with."""

    kind: Literal["invalid", "unsupported", "too_large"]
    message: str
    errors: list[RowError] = []
    total: int = 0
    reason: str | None = None
    container: Container = "jsonl"

    def exception(self) -> Exception:
        if self.kind == "invalid":
            return InvalidDataset(self.errors, self.total, self.reason, self.container)
        return (UnsupportedFile if self.kind == "unsupported" else DatasetTooLarge)(self.message)


class ChildFailed(RuntimeError):
    """The validation process ended without an answer (killed, out of memory)."""


def validate_in_child(
    src: io.RawIOBase,
    dst: Draft,
    *,
    hint: Container | None = None,
    mapping: FieldMapping | None = None,
    limits: Limits,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
) -> IngestResult:
    """:func:`validate_stream` of ``src`` into ``dst``, run in a child process."""
    body_r, body_w = os.pipe()
    back_r, back_w = os.pipe()
    _widen(body_w)
    options = _Options(hint, mapping, limits, on_invalid, max_invalid_fraction, back_r)
    try:
        proc = subprocess.Popen(
            module_command(__name__, msgspec.json.encode(options).decode()),
            stdin=body_r,
            stdout=subprocess.PIPE,
            pass_fds=(back_r,),
        )
    except BaseException:
        os.close(body_w)
        os.close(back_w)
        raise
    finally:
        os.close(body_r)
        os.close(back_r)
    assert proc.stdout is not None
    _widen(proc.stdout.fileno())
    answer = _Answer(proc, dst, back_w)
    body = os.fdopen(body_w, "wb", buffering=0)
    try:
        _feed(src, body)
        body.close()  # the end, to the child: it answers
        answer.thread.join()
    finally:
        # A body that stopped short (the child, stopped first, never sees its end as one).
        if proc.poll() is None:
            proc.kill()
        body.close()
        proc.wait()
        answer.thread.join()
        proc.stdout.close()
    return answer.result()


def _feed(src: io.RawIOBase, body: IO[bytes]) -> None:
    """The body's bytes to the child, until it ends or the child stops reading (it refused
    the dataset early, or died: its answer says which)."""
    buffer = bytearray(CHUNK)
    while n := src.readinto(buffer):
        view = memoryview(buffer)[:n]
        try:
            while view:
                view = view[body.write(view) :]
        except BrokenPipeError:
            return


class _Answer:
    """Reads the child's frames in a thread of its own: rows into the draft, read-backs and
    restarts of it, then the result."""

    def __init__(self, proc: subprocess.Popen[bytes], dst: Draft, back_w: int) -> None:
        assert proc.stdout is not None
        self.proc, self.frames, self.dst, self.back_w = proc, proc.stdout, dst, back_w
        self.done: IngestResult | _Failure | BaseException | None = None
        self.failed: BaseException | None = None
        """The read-back's failure: it outweighs whatever the child answered."""
        self.thread = threading.Thread(target=self._run, name="ftune-offload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        back: threading.Thread | None = None
        try:
            while len(header := self.frames.read(_HEADER.size)) == _HEADER.size:
                tag, size = _HEADER.unpack(header)
                payload = self.frames.read(size)
                if len(payload) < size:  # the child died mid-frame: no answer
                    break
                if tag == _DATA:
                    self.dst.write(payload)
                elif tag == _REREAD:
                    back = threading.Thread(target=self._send_back, args=(reread(self.dst),))
                    back.start()
                elif tag == _RESTART:
                    restart(self.dst)
                elif tag == _RESULT:
                    self.done = msgspec.msgpack.decode(payload, type=IngestResult)
                elif tag == _FAILED:
                    self.done = msgspec.msgpack.decode(payload, type=_Failure)
        except BaseException as e:  # the draft's own failure (the store is down): the answer;
            self.done = e  # the child, no longer read, is stopped (and the body's feed with it)
            self.proc.kill()
        finally:
            if back is not None:
                back.join()
            with contextlib.suppress(OSError):
                os.close(self.back_w)

    def _send_back(self, src: BinaryIO) -> None:
        """What the draft held, to the child. Should reading it fail, the child is stopped
        before its pipe is closed: an early end would be taken for all the rows."""
        out, self.back_w = os.fdopen(self.back_w, "wb"), -1
        try:
            with src:
                shutil.copyfileobj(src, out, CHUNK)
        except BrokenPipeError:  # the child stopped reading: its answer says why
            pass
        except BaseException as e:
            self.failed = e
            self.proc.kill()
        finally:
            with contextlib.suppress(OSError):
                out.close()

    def result(self) -> IngestResult:
        if self.failed is not None:
            raise self.failed
        done = self.done
        if isinstance(done, IngestResult):
            return done
        if isinstance(done, _Failure):
            raise done.exception()
        if isinstance(done, BaseException):
            raise done
        raise ChildFailed("the dataset's validation process ended without an answer")


def _widen(fd: int) -> None:
    """Past the host's maximum, or not on Linux (no F_SETPIPE_SZ): the pipe stays as it is."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setsize, PIPE_BYTES)


# -- the child ---------------------------------------------------------------------------------


class _ToParent(Draft):
    """The child's side of the draft: what is written goes to the parent, which holds it."""

    def __init__(self, out: IO[bytes], back_fd: int) -> None:
        self.out = out
        self.back_fd = back_fd
        self.lock = threading.Lock()
        """Rows are written by the output's thread, read-back requests by the main one."""

    def send(self, tag: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        with self.lock:
            self.out.write(_HEADER.pack(tag, len(payload)))
            self.out.write(payload)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.send(_DATA, data)
        return len(data)

    def reread(self) -> BinaryIO:
        self.send(_REREAD)
        self.out.flush()
        return os.fdopen(self.back_fd, "rb")

    def restart(self) -> None:
        self.send(_RESTART)

    def commit(self, key: str) -> None:
        raise TypeError("the parent commits the draft")

    def discard(self) -> None:
        raise TypeError("the parent discards the draft")


def _main(argv: list[str]) -> int:
    """``python -m service.datasets.offload OPTIONS``: the body on stdin, frames on stdout."""
    options = msgspec.json.decode(argv[0], type=_Options)
    with open(sys.stdout.fileno(), "wb", closefd=False) as out:
        dst = _ToParent(out, options.reread_fd)
        try:
            result = validate_stream(
                io.FileIO(sys.stdin.fileno(), closefd=False),
                dst,
                hint=options.hint,
                mapping=options.mapping,
                limits=options.limits,
                on_invalid=options.on_invalid,
                max_invalid_fraction=options.max_invalid_fraction,
            )
        except InvalidDataset as e:
            failure = _Failure("invalid", str(e), e.errors, e.total, e.reason, e.container)
            dst.send(_FAILED, msgspec.msgpack.encode(failure))
        except UnsupportedFile as e:
            dst.send(_FAILED, msgspec.msgpack.encode(_Failure("unsupported", str(e))))
        except DatasetTooLarge as e:
            dst.send(_FAILED, msgspec.msgpack.encode(_Failure("too_large", str(e))))
        else:
            dst.send(_RESULT, msgspec.msgpack.encode(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
