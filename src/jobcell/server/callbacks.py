"""The subscriber-callback sender: POSTs the OGC callbacks of jobs, with retries.

:func:`run` is an asyncio loop the server runs beside its routes. Every ``poll_s`` it
asks :func:`jobcell.subscribers.due_deliveries` which callbacks are due (that settles
them against their jobs' states in the database), and POSTs each as JSON:

- ``inProgress``: the job's statusInfo, ``running`` (a retry that goes out after the
  job ended says so too: the success or failed callback tells the end);
- ``success``: the results document (as ``GET /jobs/{id}/results``, with fresh signed
  file URLs), with ``Content-Location: <server>/jobs/{id}/results``;
- ``failed``: the job's statusInfo (``failed`` or ``dismissed``).

statusInfo bodies carry ``Content-Location: <server>/jobs/{id}``; ``<server>`` is the
URL the execute request came in on. A 2xx answer is delivered; anything else (no
status within ``timeout_s``, which bounds the whole POST; a refused connection; another
status, redirects too) is retried with exponential backoff, and after the last attempt
the delivery is given up (:class:`jobcell.subscribers.RetryPolicy`). The answer's body
is never read. The callbacks of one job go out in order; different jobs' go out
concurrently, so a slow or failing receiver delays only its own callbacks, and never
the job. Blocking store calls run in threads.

Each callback is claimed in the database before it is sent
(:func:`jobcell.subscribers.claim`) and its attempt recorded only while the row is as
claimed, so a stale read never sends a delivered callback again nor overwrites it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
from collections.abc import Iterable
from typing import IO, Any

import httpx

from jobcell import __version__, subscribers
from jobcell.errors import NotFoundError
from jobcell.server.deps import file_path
from jobcell.server.ogc_models import results_document, status_info
from jobcell.server.signing import UrlSigner, load_signing_key
from jobcell.service import Cell
from jobcell.store.base import DeliveryRow
from jobcell.subscribers import RetryPolicy

log = logging.getLogger("jobcell.server.callbacks")
POLL_S = 0.3
CONCURRENCY = 16
# A claimed callback is due again this long after its POST's time ran out, should its
# sender die before recording the attempt (another server then sends it again).
LEASE_MARGIN_S = 30.0
# Recording an attempt that fails (a full disk, a locked database) is tried again after
# these many seconds, doubling up to the second: the POST is never repeated for it.
RECORD_RETRY_S = (0.5, 60.0)
# How long a stopping sender waits for its cancelled tasks and hands back their claims.
STOP_GRACE_S = 1.0
SENDER_LOCK = "callback-sender.lock"
LOCK_RETRY_S = 2.0      # how often a waiting sender tries to take over


async def run(cell: Cell, stop: asyncio.Event, *, policy: RetryPolicy | None = None,
              poll_s: float = POLL_S, concurrency: int = CONCURRENCY) -> None:
    """Send due callbacks until ``stop`` is set, then return promptly: what is in
    flight then is handed back and sent again by the next server (delivery is at least
    once). A round that fails is logged, and the loop goes on."""
    lock = await _sender_lock(cell, stop)
    if lock is None:
        return
    try:
        await _run(cell, stop, policy, poll_s, concurrency)
    finally:
        lock.close()


async def _sender_lock(cell: Cell, stop: asyncio.Event) -> IO[str] | None:
    """One sender per cell (several server processes, or servers, on one home): the
    holder of ``locks/callback-sender.lock`` sends, so a job's callbacks go out in order;
    the others wait to take over. None when ``stop`` comes first."""
    handle = (cell.home.locks / SENDER_LOCK).open("a")
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), timeout=LOCK_RETRY_S)
        except TimeoutError:
            continue
        handle.close()
        return None


async def _run(cell: Cell, stop: asyncio.Event, policy: RetryPolicy | None, poll_s: float,
               concurrency: int) -> None:
    policy = policy or RetryPolicy.from_settings(cell.settings)
    signer = UrlSigner(load_signing_key(cell.home), cell.settings.download_url_ttl_s)
    limit = asyncio.Semaphore(concurrency)
    in_flight: dict[str, asyncio.Task[None]] = {}
    headers = {"User-Agent": f"jobcell/{__version__} (callbacks)"}
    async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False,
                                 headers=headers) as client:
        sender = _Sender(cell, client, signer, policy, limit)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                ready = await _read_due(cell, stopping)
                if ready is None:
                    break
                try:
                    _start(sender, ready, in_flight)
                except Exception:   # never let a bad round stop the sender
                    log.exception("the callback sender failed a round; going on")
                await asyncio.wait({stopping}, timeout=poll_s)
        finally:
            stopping.cancel()
            await _stop(cell, sender, in_flight)


async def _read_due(cell: Cell, stopping: asyncio.Future[Any]) -> list[DeliveryRow] | None:
    """The due callbacks (none when the read fails), or None when ``stopping`` comes
    first (the read, in its thread, is left to finish on its own)."""
    read = asyncio.ensure_future(asyncio.to_thread(subscribers.due_deliveries, cell))
    await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not read.done():
        read.cancel()
        return None
    try:
        return read.result()
    except Exception:   # a locked or missing database: try again next round
        log.exception("could not read the due callbacks")
        return []


def _start(sender: _Sender, ready: list[DeliveryRow],
           in_flight: dict[str, asyncio.Task[None]]) -> None:
    """One task per job not already in flight (its rows go out in order)."""
    for job_id, rows in _by_job(ready).items():
        if job_id in in_flight:
            continue
        task = asyncio.create_task(sender.deliver(rows))
        in_flight[job_id] = task
        task.add_done_callback(lambda done, key=job_id: _finished(in_flight, key, done))


def _finished(in_flight: dict[str, asyncio.Task[None]], job_id: str,
              task: asyncio.Task[None]) -> None:
    in_flight.pop(job_id, None)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("the callbacks of job %s stopped unexpectedly", job_id, exc_info=exc)


async def _stop(cell: Cell, sender: _Sender, in_flight: dict[str, asyncio.Task[None]]) -> None:
    """Cancel what is in flight and hand its claimed rows back, within STOP_GRACE_S."""
    claimed = list(sender.claimed.values())
    tasks = list(in_flight.values())
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    if claimed:
        def release() -> None:
            for row in claimed:
                subscribers.release(cell, row)

        handing_back = asyncio.ensure_future(asyncio.to_thread(release))
        await asyncio.wait({handing_back}, timeout=STOP_GRACE_S)
        if handing_back.done():
            if not handing_back.cancelled() and handing_back.exception() is not None:
                log.warning("could not hand back the callbacks in flight (they are sent "
                            "again later)", exc_info=handing_back.exception())
        else:
            handing_back.cancel()


def _by_job(rows: Iterable[DeliveryRow]) -> dict[str, list[DeliveryRow]]:
    grouped: dict[str, list[DeliveryRow]] = {}
    for row in rows:
        grouped.setdefault(row.job_id, []).append(row)
    return grouped


class _Sender:
    def __init__(self, cell: Cell, client: httpx.AsyncClient, signer: UrlSigner,
                 policy: RetryPolicy, limit: asyncio.Semaphore) -> None:
        self.cell = cell
        self.client = client
        self.signer = signer
        self.policy = policy
        self.limit = limit
        self.lease_s = policy.timeout_s + LEASE_MARGIN_S
        self.claimed: dict[int, DeliveryRow] = {}   # seq -> row taken, not yet recorded

    async def deliver(self, rows: list[DeliveryRow]) -> None:
        """Send one job's due callbacks in order; record each attempt."""
        for row in sorted(rows, key=lambda r: r.seq):
            try:
                await self._deliver_one(row)
            except asyncio.CancelledError:
                raise
            except Exception:   # never let one callback stop the sender
                log.exception("callback %s of job %s failed unexpectedly", row.kind,
                              row.job_id)

    async def _deliver_one(self, row: DeliveryRow) -> None:
        async with self.limit:
            # Taken atomically: a stale read of a row sent meanwhile gets nothing.
            claimed = await asyncio.to_thread(subscribers.claim, self.cell, row,
                                              self.lease_s)
            if claimed is None:
                return
            self.claimed[claimed.seq] = claimed
            try:
                body, location = await asyncio.to_thread(payload, self.cell, self.signer,
                                                         claimed)
            except NotFoundError:
                await asyncio.to_thread(subscribers.skip, self.cell, claimed,
                                        "the job no longer exists")
                self.claimed.pop(claimed.seq, None)
                return
            except Exception as exc:   # a failed attempt, so it cannot loop forever
                log.exception("could not build callback %s of job %s", row.kind,
                              row.job_id)
                error: str | None = f"could not build the callback body: {_describe(exc)}"
            else:
                error = await self._post(row.uri, body, location)
        state = await self._record(claimed, error)
        self.claimed.pop(claimed.seq, None)
        if error is not None:
            log.info("callback %s of job %s to %s: %s (now %s)", row.kind, row.job_id,
                     row.uri, error, state)

    async def _record(self, row: DeliveryRow, error: str | None) -> str:
        """Record the attempt, trying again with backoff while that fails (the POST is
        not repeated for it)."""
        wait_s, most_s = RECORD_RETRY_S
        while True:
            try:
                return await asyncio.to_thread(subscribers.record_attempt, self.cell, row,
                                               error, self.policy)
            except Exception:
                log.exception("could not record callback %s of job %s; trying again in "
                              "%g s", row.kind, row.job_id, wait_s)
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, most_s)

    async def _post(self, uri: str, body: Any, location: str) -> str | None:
        """None when the receiver took it (2xx), else what went wrong. ``timeout_s``
        bounds the whole POST; the answer's body is never read."""
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                async with self.client.stream("POST", uri, json=body,
                                              headers={"Content-Location": location}
                                              ) as answer:
                    status = answer.status_code
        except (TimeoutError, httpx.TimeoutException):
            return f"no answer within {self.policy.timeout_s:g} s"
        except Exception as exc:   # refused, reset, a URL httpx cannot use, ...
            return _describe(exc)
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"HTTP {status} (redirects are not followed)"
        return f"HTTP {status}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def payload(cell: Cell, signer: UrlSigner, row: DeliveryRow) -> tuple[Any, str]:
    """The JSON body of a callback and the URL of the resource it shows.

    :class:`NotFoundError` when the job is gone.
    """
    base = subscribers.base_url_of(cell, row.job_id) or ""
    status = cell.status(row.job_id)
    job_url = f"{base}/jobs/{row.job_id}"
    if row.kind == "inProgress":
        # It was triggered by the job running; a retry may go out after the job ended,
        # and still says running (the success or failed callback tells the end).
        status = {**status, "state": "running", "finished_at": None}
    if row.kind == "success" and status["state"] == "succeeded":
        result = cell.result(row.job_id)
        links = signed_links(signer, base, row.job_id, result["outputs"])
        return (results_document(result, links, single_step=len(status["steps"]) == 1),
                f"{job_url}/results")
    return status_info(status, base).model_dump(mode="json", exclude_none=True), job_url


def signed_links(signer: UrlSigner, base: str, job_id: str,
                 outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outputs with fresh signed download URLs under ``base``."""
    entries = []
    for out in outputs:
        url, _ = signer.sign(file_path(job_id, out["step"], out["name"]))
        entries.append({"step": out["step"], "name": out["name"], "href": base + url})
    return entries
