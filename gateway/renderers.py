"""Render workers: pixel data decoded for people (DICOMweb frames, rendered images, thumbnails, WADO-URI) in
processes of their own, beside the event loop and apart from the mail workers.

Why processes of their own:
- **Never behind a mail.** The mail workers build S/MIME sets that take seconds; a viewer scrolling through a CT
  asks for a frame every few milliseconds. Sharing a pool made a scroll wait for a mail. The mail workers run
  niced (bulk work); these do not (a person waits).
- **Hostile pixel data stays outside.** A partner's instance reaches a decoder (OpenJPEG, libjpeg) here for the
  first time. A decoder that crashes takes down one worker, not the gateway; one that loops or allocates without
  end is stopped after `[web] render_timeout` seconds and by an address-space limit (`render_memory`); the
  request gets a clear error and the next one a fresh worker.
- **No pickle across the boundary.** Requests and answers are a JSON header and raw byte payloads over the
  worker's stdin and stdout, read by the event loop without blocking (asyncio pipes): nothing a compromised
  decoder writes can run code in the gateway.

Each worker serves one request at a time; requests beyond the number of workers wait for the next free one.
Run as `python -m gateway.renderers <gateway pid> <log level> <memory limit>` (by `RenderWorkers` only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Any

from gateway import imaging

log = logging.getLogger(__name__)

HEAD = struct.Struct(">I")


class RenderFailed(Exception):
    """A worker crashed, took too long or answered nonsense: the request gets a 503-like error."""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin, self.stdout = proc.stdin, proc.stdout
        self.last_used = 0.0
        self.timer: asyncio.TimerHandle | None = None

    async def call(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        body = json.dumps(request).encode()
        self.stdin.write(HEAD.pack(len(body)) + body)
        await self.stdin.drain()
        (n,) = HEAD.unpack(await self.stdout.readexactly(HEAD.size))
        if n > 1 << 20:
            raise RenderFailed("an answer header over 1 MB")
        header = json.loads(await self.stdout.readexactly(n))
        blobs = [await self.stdout.readexactly(int(size)) for size in header.get("sizes", [])]
        return header, blobs

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class RenderWorkers:
    """Up to `count` render worker processes: all started together when the first is needed (a second request
    then waits for whichever is free first, not for a process to start), replaced when one fails, and ended
    after `idle` seconds without work (a gateway nobody looks at keeps no decoder processes)."""

    def __init__(self, count: int, timeout: float, memory: int, idle: float = 600.0) -> None:
        self.count, self.timeout, self.memory, self.idle = max(1, count), timeout, memory, idle
        self._slots = asyncio.Semaphore(self.count)
        self._ready = asyncio.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._live = 0  # started or starting
        self._spawns: set[asyncio.Task[None]] = set()
        self._start_failed = 0  # how many starts failed (a waiter gives up when this moves)
        self.failures = 0  # workers killed for a crash, a timeout or a bad answer

    async def _start(self) -> _Worker:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.renderers",
            str(os.getpid()),
            str(level),
            str(self.memory),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = _Worker(proc)
        self._all.add(worker)
        return worker

    def prestart(self) -> None:
        """Start the workers now, in the background (a viewer opened its study list: images will follow)."""
        while self._live < self.count:
            self._live += 1
            task = asyncio.get_running_loop().create_task(self._spawn())
            self._spawns.add(task)
            task.add_done_callback(self._spawns.discard)

    async def _spawn(self) -> None:
        try:
            worker = await self._start()
        except Exception as exc:  # no process could be started (out of memory, no executable)
            log.error("a render worker could not be started: %s", type(exc).__name__)
            async with self._ready:
                self._live -= 1
                self._start_failed += 1
                self._ready.notify_all()
            return
        await self._give_back(worker)

    async def _give_back(self, worker: _Worker) -> None:
        worker.last_used = asyncio.get_running_loop().time()
        async with self._ready:
            self._idle.append(worker)
            self._ready.notify()
        if worker.timer is None:
            worker.timer = asyncio.get_running_loop().call_later(self.idle, self._retire, worker)

    def _retire(self, worker: _Worker) -> None:
        """One timer per worker: ends it when it has been idle for `idle` seconds, else looks again then."""
        worker.timer = None
        if worker not in self._all:
            return
        quiet = asyncio.get_running_loop().time() - worker.last_used
        if worker in self._idle and quiet >= self.idle * 0.99:
            self._idle.remove(worker)
            self._drop(worker)
            return
        worker.timer = asyncio.get_running_loop().call_later(
            max(self.idle - quiet, 1.0), self._retire, worker
        )

    def _drop(self, worker: _Worker) -> None:
        worker.kill()
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        if worker in self._all:
            self._all.discard(worker)
            self._live -= 1

    async def _get(self, fresh: bool = False) -> _Worker:
        """An idle worker, or the next one to become idle or to have started. `fresh`: not one of the idle ones
        (a worker just turned out dead; whatever killed it, the OOM killer or an operator, may have killed the
        idle ones too, before the event loop has heard of it), so those are ended and new ones started."""
        async with self._ready:
            if fresh:
                for worker in self._idle:
                    self._drop(worker)
                self._idle.clear()
            failed = self._start_failed
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.proc.returncode is None:
                        return worker
                    self._drop(worker)  # died while idle (killed by someone)
                if self._start_failed != failed:
                    raise RenderFailed("no render worker could be started")
                self.prestart()
                await self._ready.wait()

    async def call(self, op: str, **args: Any) -> tuple[dict[str, Any], list[bytes]]:
        """Run `op` (render, frames, thumbnail) in a worker: its result header and payloads. Raises the
        `imaging` errors the worker reports, FileNotFoundError for a file that is gone, RenderFailed otherwise.
        A worker that turns out dead (killed while idle, or crashed on this request) is replaced and the request
        tried once more in a fresh one; a second crash, a timeout or nonsense is the request's failure."""
        async with self._slots:
            for attempt in (1, 2):
                try:
                    header, blobs = await self._once({"op": op, "args": args}, fresh=attempt == 2)
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    if attempt == 2:
                        raise RenderFailed("the image could not be made (the worker ended)") from None
                except (TimeoutError, ValueError, KeyError):
                    raise RenderFailed("the image could not be made in time") from None
        if header.get("ok"):
            return header, blobs
        kind, text = header.get("kind"), str(header.get("text", ""))[:200]
        if kind == "frame":
            raise imaging.NoSuchFrame(text)
        if kind == "gone":
            raise FileNotFoundError(text)
        raise imaging.Undecodable(text)

    async def _once(self, request: dict[str, Any], fresh: bool) -> tuple[dict[str, Any], list[bytes]]:
        """One request in one worker; a worker that fails in any way is killed (and replaced when next needed)."""
        worker = await self._get(fresh)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await worker.call(request)
        except BaseException as exc:  # cancelled, crashed, too slow or out of step: never reused
            self._drop(worker)
            if not isinstance(exc, asyncio.CancelledError):
                self.failures += 1
                log.warning("a render worker failed (%s): replaced", type(exc).__name__)
            raise
        await self._give_back(worker)
        return answer

    def pids(self) -> list[int]:
        """The worker processes running now."""
        return [w.proc.pid for w in self._all]

    async def render(
        self,
        path: Path,
        frame: int,
        window: imaging.Window | None,
        viewport: tuple[int, int] | None,
        media_type: str,
        quality: int,
    ) -> bytes:
        _, [image] = await self.call(
            "render",
            path=str(path),
            frame=frame,
            window=None if window is None else [window.center, window.width],
            viewport=None if viewport is None else list(viewport),
            media_type=media_type,
            quality=quality,
        )
        return image

    async def raw_frames(
        self, path: Path, numbers: list[int], keep_compressed: bool
    ) -> tuple[list[bytes], str]:
        header, frames = await self.call("frames", path=str(path), numbers=numbers, keep=keep_compressed)
        return frames, str(header["syntax"])

    async def thumbnail(self, path: Path, size: int) -> bytes:
        _, [png] = await self.call("thumbnail", path=str(path), size=size)
        return png

    async def close(self) -> None:
        for task in list(self._spawns):
            task.cancel()
        for worker in list(self._all):
            self._drop(worker)
            with contextlib.suppress(ProcessLookupError):
                await worker.proc.wait()
        self._idle.clear()


# ------------------------------------------------------------------------------------------------ the worker side
def _serve(op: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    path = Path(str(args["path"]))
    if op == "render":
        w, v = args.get("window"), args.get("viewport")
        image = imaging.render(
            path,
            int(args["frame"]),
            None if w is None else imaging.Window(float(w[0]), float(w[1])),
            None if v is None else (int(v[0]), int(v[1])),
            str(args["media_type"]),
            int(args["quality"]),
        )
        return {}, [image]
    if op == "frames":
        frames, syntax = imaging.raw_frames(path, [int(n) for n in args["numbers"]], bool(args["keep"]))
        return {"syntax": syntax}, frames
    if op == "thumbnail":
        return {}, [imaging.thumbnail_png(str(path), int(args["size"]))]
    raise ValueError(f"no operation {op[:32]!r}")


def _answer(op: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    try:
        header, blobs = _serve(op, args)
        return {"ok": True, "sizes": [len(b) for b in blobs], **header}, blobs
    except imaging.NoSuchFrame as exc:
        return {"ok": False, "kind": "frame", "text": str(exc)}, []
    except FileNotFoundError:
        return {"ok": False, "kind": "gone", "text": "the instance's file is no longer kept"}, []
    except imaging.Undecodable as exc:
        return {"ok": False, "kind": "decode", "text": str(exc)}, []
    except MemoryError:
        return {"ok": False, "kind": "decode", "text": "the pixel data is too large to decode here"}, []
    except Exception as exc:  # a decoder's own failure on odd data: an answer, not a dead worker
        log.info("render %s failed: %s", op, type(exc).__name__)
        return {
            "ok": False,
            "kind": "decode",
            "text": f"the image could not be made ({type(exc).__name__})",
        }, []


def main(argv: list[str]) -> None:
    import resource

    from gateway.children import die_with_parent
    from gateway.logsetup import setup_logging

    parent, level, memory = int(argv[0]), argv[1], int(argv[2])
    die_with_parent(parent)
    setup_logging(level)
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # the protocol owns the original stdout; anything a library prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    while True:
        head = inp.read(HEAD.size)
        if len(head) < HEAD.size:
            return  # the gateway closed the pipe
        request = json.loads(inp.read(HEAD.unpack(head)[0]))
        header, blobs = _answer(str(request["op"]), dict(request["args"]))
        data = json.dumps(header).encode()
        out.write(HEAD.pack(len(data)) + data)
        for blob in blobs:
            out.write(blob)
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
