"""The subscriber-callback sender: POSTs the OGC callbacks of jobs, with retries.

:func:`run` is an asyncio loop the server runs beside its routes. Every ``poll_s`` it
asks :func:`jobcell.subscribers.due_deliveries` which callbacks are due (that settles
them against their jobs' states in the database), and POSTs each as JSON:

- ``inProgress``: the job's statusInfo (``running``);
- ``success``: the results document (as ``GET /jobs/{id}/results``, with fresh signed
  file URLs), with ``Content-Location: <server>/jobs/{id}/results``;
- ``failed``: the job's statusInfo (``failed`` or ``dismissed``).

statusInfo bodies carry ``Content-Location: <server>/jobs/{id}``; ``<server>`` is the
URL the execute request came in on. A 2xx answer is delivered; anything else (no
answer within ``timeout_s``, a refused connection, another status, redirects too) is
retried with exponential backoff, and after the last attempt the delivery is given up
(:class:`jobcell.subscribers.RetryPolicy`). The callbacks of one job go out in order;
different jobs' go out concurrently, so a slow or failing receiver delays only its
own callbacks, and never the job. Blocking store calls run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

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


async def run(cell: Cell, stop: asyncio.Event, *, policy: RetryPolicy | None = None,
              poll_s: float = POLL_S, concurrency: int = CONCURRENCY) -> None:
    """Send due callbacks until ``stop`` is set (what is in flight then is sent again
    by the next server: delivery is at least once)."""
    policy = policy or RetryPolicy.from_settings(cell.settings)
    signer = UrlSigner(load_signing_key(cell.home), cell.settings.download_url_ttl_s)
    limit = asyncio.Semaphore(concurrency)
    in_flight: dict[str, asyncio.Task[None]] = {}
    headers = {"User-Agent": f"jobcell/{__version__} (callbacks)"}
    async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False,
                                 headers=headers) as client:
        sender = _Sender(cell, client, signer, policy, limit)
        try:
            while not stop.is_set():
                try:
                    ready = await asyncio.to_thread(subscribers.due_deliveries, cell)
                except Exception:   # a locked or missing database: try again next round
                    log.exception("could not read the due callbacks")
                    ready = []
                for job_id, rows in _by_job(ready).items():
                    if job_id in in_flight:
                        continue
                    task = asyncio.create_task(sender.deliver(rows))
                    in_flight[job_id] = task
                    task.add_done_callback(lambda _, key=job_id: in_flight.pop(key, None))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), poll_s)
        finally:
            tasks = list(in_flight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


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

    async def deliver(self, rows: list[DeliveryRow]) -> None:
        """Send one job's due callbacks in order; record each attempt."""
        for row in sorted(rows, key=lambda r: r.seq):
            try:
                async with self.limit:
                    await self._deliver_one(row)
            except asyncio.CancelledError:
                raise
            except Exception:   # never let one callback stop the sender
                log.exception("callback %s of job %s failed unexpectedly", row.kind,
                              row.job_id)

    async def _deliver_one(self, row: DeliveryRow) -> None:
        try:
            body, location = await asyncio.to_thread(payload, self.cell, self.signer,
                                                     row)
        except NotFoundError:
            await asyncio.to_thread(subscribers.skip, self.cell, row,
                                    "the job no longer exists")
            return
        except Exception as exc:   # counted as a failed attempt, so it cannot loop forever
            log.exception("could not build callback %s of job %s", row.kind, row.job_id)
            error: str | None = f"could not build the callback body: {_describe(exc)}"
        else:
            error = await self._post(row.uri, body, location)
        state = await asyncio.to_thread(subscribers.record_attempt, self.cell, row, error,
                                        self.policy)
        if error is not None:
            log.info("callback %s of job %s to %s: %s (now %s)", row.kind, row.job_id,
                     row.uri, error, state)

    async def _post(self, uri: str, body: Any, location: str) -> str | None:
        """None when the receiver took it (2xx), else what went wrong."""
        try:
            answer = await self.client.post(uri, json=body,
                                            headers={"Content-Location": location})
        except httpx.TimeoutException:
            return f"no answer within {self.policy.timeout_s:g} s"
        except Exception as exc:   # refused, reset, a URL httpx cannot use, ...
            return _describe(exc)
        if 200 <= answer.status_code < 300:
            return None
        if 300 <= answer.status_code < 400:
            return f"HTTP {answer.status_code} (redirects are not followed)"
        return f"HTTP {answer.status_code}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def payload(cell: Cell, signer: UrlSigner, row: DeliveryRow) -> tuple[Any, str]:
    """The JSON body of a callback and the URL of the resource it shows.

    :class:`NotFoundError` when the job is gone.
    """
    base = subscribers.base_url_of(cell, row.job_id) or ""
    status = cell.status(row.job_id)
    job_url = f"{base}/jobs/{row.job_id}"
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
