"""Upload: one remote object written as a stream (S3 multipart with bounded parts in flight, or
fsspec's uncommitted writer), visible only once complete."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ckptctl.errors import CkptError, CorruptFile
from ckptctl.sources.config import STATS, _fs, _lock
from ckptctl.sources.remote import _as_remote
from ckptctl.sources.retry import _call
from ckptctl.sources.writes import check_writable_target, forget

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

# bytes per uploaded part (S3: 5 MiB..5 GiB, at most 10,000 parts) and parts uploading at once:
# memory is at most (UPLOAD_IN_FLIGHT + 1) parts. 8 MiB x 8 (s3transfer: 8 MiB x 10) uploaded a
# 200 MB file to moto in 7.5-7.7 s where 16 MiB x 4 took 8-10 s (interleaved, loaded machine).
UPLOAD_PART = 8 * 1024 * 1024
UPLOAD_IN_FLIGHT = 8
MAX_PARTS = 10_000


class Upload:
    """One remote object written as a stream: nothing is visible at the URL until `complete()`,
    and `abort()` leaves nothing (the multipart upload is aborted).

    S3 (s3fs): a multipart upload of UPLOAD_PART-sized parts (8 MiB), UPLOAD_IN_FLIGHT (8) uploading at once
    on a thread pool while the caller produces the next; memory stays at a few parts whatever the
    object's size. Objects smaller than one part go up in one PUT at `complete()`. Other
    protocols use fsspec's own writer (`fs.open(..., "wb", autocommit=False)`, `commit()` /
    `discard()`). `size_hint` (bytes, when known) raises the part size so that the object fits
    in S3's 10,000 parts.
    """

    def __init__(self, path, size_hint: int | None = None, progress=None):
        self.path = _as_remote(path)
        self.url = str(self.path)
        check_writable_target(self.path)
        self.fs, self.key = _fs(self.path)
        self.part = UPLOAD_PART
        if size_hint:
            need = -(-size_hint // (MAX_PARTS - 1))
            self.part = max(self.part, -(-need // (1 << 20)) << 20)
        self.progress = progress
        self.size = 0
        self._buf = bytearray()
        self._done = False
        self._s3 = hasattr(self.fs, "call_s3")
        self._mpu: str | None = None
        self._parts: list = []  # futures of {"PartNumber", "ETag"}
        self._pool: ThreadPoolExecutor | None = None  # S3: uploads the parts, made with the multipart upload
        self._file: Any = None  # other protocols: fsspec's uncommitted writer
        if self._s3:
            self.bucket, _, self.obj = self.key.partition("/")
        else:
            self._file = _call(self.url, self.fs.open, self.key, "wb", block_size=self.part, autocommit=False)

    # -- writing ------------------------------------------------------------------------------
    def write(self, data) -> None:
        if self._done:
            raise RuntimeError("upload already completed or aborted")
        mv = memoryview(data).cast("B")
        if not self._s3:
            _call(self.url, self._file.write, mv)
            self.size += len(mv)
            if self.progress:
                self.progress(len(mv))
            return
        while mv:
            take = min(len(mv), self.part - len(self._buf))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) >= self.part:
                self._send(bytes(self._buf))
                self._buf = bytearray()

    def write_file(self, path, offset: int = 0, length: int | None = None) -> None:
        """Upload `length` bytes of a local file from `offset` (one part read at a time)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            done = 0
            while done < length:
                want = min(self.part - len(self._buf) if self._s3 else self.part, length - done)
                data = os.pread(fd, want, offset + done)
                if not data:
                    raise CorruptFile(f"file ends at byte {offset + done}, expected {offset + length}", path)
                if self._s3 and not self._buf and len(data) == self.part:
                    self._send(data)
                else:
                    self.write(data)
                done += len(data)
        finally:
            os.close(fd)

    def _send(self, data: bytes) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._mpu is None:
            resp = _call(self.url, self.fs.call_s3, "create_multipart_upload", Bucket=self.bucket, Key=self.obj)
            self._mpu = resp["UploadId"]
            self._pool = ThreadPoolExecutor(UPLOAD_IN_FLIGHT, thread_name_prefix="ckptctl-upload")
        pending = [f for f in self._parts if not f.done()]
        if len(pending) >= UPLOAD_IN_FLIGHT:
            pending[0].result()  # back-pressure: at most UPLOAD_IN_FLIGHT parts in memory
        for f in self._parts:
            if f.done() and f.exception() is not None:
                raise f.exception()
        number = len(self._parts) + 1
        assert self._pool is not None  # made above with the multipart upload
        self._parts.append(self._pool.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> dict:
        resp = _call(
            self.url,
            self.fs.call_s3,
            "upload_part",
            Bucket=self.bucket,
            Key=self.obj,
            UploadId=self._mpu,
            PartNumber=number,
            Body=data,
        )
        with _lock:
            STATS["sent"] = STATS.get("sent", 0) + len(data)
            STATS["parts"] = STATS.get("parts", 0) + 1
            self.size += len(data)
        if self.progress:
            self.progress(len(data))
        return {"PartNumber": number, "ETag": resp["ETag"]}

    # -- ending -------------------------------------------------------------------------------
    def complete(self) -> None:
        """Make the object appear at the URL, whole (an existing object is replaced only now)."""
        if self._done:
            raise RuntimeError("upload already completed or aborted")
        try:
            if not self._s3:
                _call(self.url, self._file.close)
                _call(self.url, self._file.commit)
            elif self._mpu is None:
                data = bytes(self._buf)
                _call(self.url, self.fs.call_s3, "put_object", Bucket=self.bucket, Key=self.obj, Body=data)
                with _lock:
                    STATS["sent"] = STATS.get("sent", 0) + len(data)
                self.size += len(data)
                if self.progress:
                    self.progress(len(data))
            else:
                if self._buf:
                    self._send(bytes(self._buf))
                    self._buf = bytearray()
                parts = [f.result() for f in self._parts]
                _call(
                    self.url,
                    self.fs.call_s3,
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.obj,
                    UploadId=self._mpu,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._shutdown()
        forget(self.path)

    def abort(self) -> None:
        """Leave nothing behind: cancel queued parts and abort the multipart upload (idempotent)."""
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        for f in self._parts:
            f.cancel()
        self._shutdown()
        if self._file is not None:
            try:
                self._file.discard()
            except Exception:  # noqa: BLE001 - best effort; nothing was committed
                pass
        if self._mpu is not None:
            try:
                _call(
                    self.url,
                    self.fs.call_s3,
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.obj,
                    UploadId=self._mpu,
                )
            except CkptError:
                pass
            self._mpu = None

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.complete()
