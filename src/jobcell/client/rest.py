"""The REST backend: executions run in a ``jobcell serve`` cell, reached over HTTP.

The client only ever asks (there is no push from the server): it submits, polls the
status, and fetches the result. A lost connection while polling is retried with
backoff until the server answers again, so a network outage only delays catching up.
Runners are not registered from the client: the server's cell must have the task's
runner (same name and version). Output files come back as signed, expiring URLs;
a file passed on to another task is copied server-side, never through the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jobcell.client.backends import (
    TASK_STEP,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    TaskDefinition,
    TaskRegistrationError,
    execution_spec,
)
from jobcell.errors import (
    ConfigError,
    DuplicateError,
    JobcellError,
    NotFoundError,
    QuotaError,
    SpecError,
    WorkerError,
)
from jobcell.fileref import FileRef

if TYPE_CHECKING:   # httpx is imported on first use: task modules import this package
    import ssl

    import httpx

logger = logging.getLogger("jobcell.client")

API = "/api/v1"
URL_ENV, TOKEN_ENV = "JOBCELL_URL", "JOBCELL_TOKEN"
GATEWAY = frozenset({502, 503, 504})
_ERRORS: dict[int, type[JobcellError]] = {400: SpecError, 404: NotFoundError,
                                          409: DuplicateError, 413: SpecError,
                                          422: SpecError, 429: QuotaError, 503: WorkerError}


class RestBackendError(JobcellError):
    """The server cannot be reached, or answered something the client cannot use."""


class AuthenticationError(RestBackendError):
    """The server refused the bearer token (401)."""


def normalise_url(url: str) -> str:
    """``scheme://host[:port][/prefix]``: lower case, no default port, no trailing slash
    and no ``/api/v1`` (either form of the server's URL may be given)."""
    import httpx

    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"the jobcell server URL {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the jobcell server URL {url!r} must be http(s)://HOST[:PORT]")
    port = parsed.port
    netloc = parsed.netloc.decode("ascii")
    if port is not None and (parsed.scheme, port) in (("http", 80), ("https", 443)):
        netloc = netloc.rsplit(":", 1)[0]
    path = parsed.path.rstrip("/")
    if path.endswith(API):
        path = path[: -len(API)]
    return f"{parsed.scheme}://{netloc}{path}"


def _errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """The transport errors raised before the request reached the server (always safe
    to send again), and those after which the server may have acted on it."""
    import httpx

    return ((httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout),
            (httpx.ReadError, httpx.WriteError, httpx.ReadTimeout, httpx.WriteTimeout,
             httpx.RemoteProtocolError))


def _shared(transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
    """A caller's transport, shared by the clients of every event loop: closing one
    client must not close it."""
    import httpx

    class SharedTransport(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await transport.handle_async_request(request)

        async def aclose(self) -> None:
            return None

    return SharedTransport()


@dataclass
class _LoopState:
    """What belongs to one event loop: its HTTP client, and a guard closing it when the
    loop shuts down (``asyncio.run`` finalizes pending async generators)."""

    client: httpx.AsyncClient
    lock: asyncio.Lock
    guard: AsyncIterator[None]


async def _closer(client: httpx.AsyncClient) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await client.aclose()


def _ssl_context(cafile: str) -> ssl.SSLContext:
    import ssl

    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"RestBackend(verify={cafile!r}): cannot load the CA bundle: "
                          f"{exc}") from None


def _detail(response: httpx.Response) -> str:
    """The problem document's ``detail``, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    text = response.text.strip()[:300]
    return text or response.reason_phrase or f"HTTP {response.status_code}"


async def _body(ref: FileRef) -> AsyncIterator[bytes]:
    """The content of ``ref`` chunk by chunk, read in a worker thread. The first chunk
    is read before the request starts, so an unreadable file fails here and not inside
    the HTTP transport."""
    chunks: Iterator[bytes] = ref.chunks()
    try:
        first = await asyncio.to_thread(next, chunks, None)
    except BaseException:
        await asyncio.to_thread(chunks.close)   # type: ignore[attr-defined]
        raise

    async def stream() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
        finally:
            await asyncio.to_thread(chunks.close)   # type: ignore[attr-defined]
    return stream()


class RestBackend:
    """A ``jobcell serve`` at ``url`` (default ``$JOBCELL_URL``), signed in with the
    bearer ``token`` (default ``$JOBCELL_TOKEN``; ``jobcell users add NAME`` makes one).

    ``poll_interval_s`` / ``max_poll_interval_s``: the status polling backoff.
    ``timeout_s``: per request. ``retry_for_s``: how long requests other than status
    polls retry a lost connection (polls retry until the server answers again).
    ``transport``: an httpx transport (e.g. ``httpx.ASGITransport`` over the app).
    ``verify``: TLS verification (False, a CA bundle path, or an ``ssl.SSLContext``).
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 poll_interval_s: float = 0.5, max_poll_interval_s: float = 5.0,
                 timeout_s: float = 30.0, retry_for_s: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 verify: bool | str | ssl.SSLContext = True) -> None:
        url = url if url is not None else os.environ.get(URL_ENV)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not url:
            raise ConfigError(f"RestBackend needs the server's URL: RestBackend(url=...) or "
                              f"the {URL_ENV} environment variable")
        if not token or not token.strip():
            raise ConfigError(f"RestBackend needs a bearer token: RestBackend(token=...) or "
                              f"the {TOKEN_ENV} environment variable (on the server: "
                              "'jobcell users add NAME' prints one)")
        self.url = normalise_url(url)
        self._token = token.strip()
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self._transport = _shared(transport) if transport is not None else None
        # A CA bundle path becomes an SSL context (httpx deprecates verify=<path>).
        self._verify: bool | ssl.SSLContext = _ssl_context(verify) \
            if isinstance(verify, str) else verify
        self._user: str | None = None
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = \
            weakref.WeakKeyDictionary()
        self._runners: dict[str, str] = {}      # task name -> the server runner's version
        self._outage: float | None = None       # when the current outage began

    def __repr__(self) -> str:
        return f"RestBackend(url={self.url!r})"

    @property
    def user(self) -> str | None:
        """The signed-in user (known after :meth:`initialize`)."""
        return self._user

    @property
    def identity(self) -> str:
        if self._user is None:
            raise RestBackendError("RestBackend.identity is known only after initialize() "
                                   "(which asks the server who the token belongs to)")
        return f"rest:{self.url}:{self._user}"

    # -- HTTP
    async def _state(self) -> _LoopState:
        """The running loop's client (made on first use in that loop)."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            import httpx

            for other in [k for k in self._loops if k.is_closed()]:
                self._loops.pop(other, None)
            client = httpx.AsyncClient(
                base_url=self.url + API, transport=self._transport, verify=self._verify,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)))
            guard = _closer(client)
            await guard.__anext__()
            state = _LoopState(client, asyncio.Lock(), guard)
            self._loops[loop] = state
        return state

    def _lost(self, what: str, error: str) -> None:
        if self._outage is None:
            self._outage = time.monotonic()
            logger.warning("lost the connection to the jobcell server at %s (%s: %s); "
                           "retrying (executions go on there)", self.url, what, error)

    def _back(self) -> None:
        if self._outage is not None:
            logger.warning("reconnected to the jobcell server at %s after %.1f s", self.url,
                           time.monotonic() - self._outage)
            self._outage = None

    async def _request(self, method: str, path: str, *, what: str, forever: bool = False,
                       resend: bool = True, ok: tuple[int, ...] = (200, 201),
                       json: Any = None, params: dict[str, Any] | None = None,
                       body: Callable[[], Awaitable[AsyncIterator[bytes]]] | None = None,
                       ) -> httpx.Response:
        """Send a request; retry connection errors (and, when ``resend``, errors after
        which the request may have arrived, and 502/503/504) with backoff, for
        ``retry_for_s`` or ``forever``. Answers a response in ``ok`` or 404; raises the
        mapped error for any other status."""
        client = (await self._state()).client
        not_sent, maybe_sent = _errors()
        started = time.monotonic()
        delay = min(0.2, self.max_poll_interval_s)
        while True:
            content = await body() if body is not None else None
            failure: str | None = None
            try:
                response = await client.request(method, path, json=json, params=params,
                                                 content=content)
            except not_sent as exc:
                failure = f"{type(exc).__name__}: {exc}"
            except maybe_sent as exc:
                if not resend:
                    raise RestBackendError(
                        f"{what}: the connection to {self.url} broke after the request was "
                        f"sent ({type(exc).__name__}: {exc}); it is not sent again because "
                        "it may have arrived") from None
                failure = f"{type(exc).__name__}: {exc}"
            finally:
                if content is not None and hasattr(content, "aclose"):
                    await content.aclose()
            if failure is None:
                if response.status_code in GATEWAY and resend and \
                        "problem+json" not in response.headers.get("content-type", ""):
                    failure = f"HTTP {response.status_code}"
                else:
                    self._back()
                    if response.status_code in ok or response.status_code == 404:
                        return response
                    raise self._error(response, what)
            self._lost(what, failure)
            if not forever and time.monotonic() - started > self.retry_for_s:
                raise RestBackendError(f"{what}: cannot reach the jobcell server at "
                                       f"{self.url} ({failure}; retried for "
                                       f"{self.retry_for_s:g} s)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.max_poll_interval_s, 0.2))

    def _error(self, response: httpx.Response, what: str) -> JobcellError:
        detail = _detail(response)
        status = response.status_code
        if status == 401:
            return AuthenticationError(
                f"the jobcell server at {self.url} refused the token: {detail} (check "
                f"{TOKEN_ENV} or the token given to RestBackend; 'jobcell users add NAME' "
                "on the server makes one)")
        kind = _ERRORS.get(status, RestBackendError)
        return kind(f"{what}: {detail}" + ("" if kind is not RestBackendError
                                             else f" (HTTP {status} from {self.url})"))

    def _found(self, response: httpx.Response, what: str) -> Any:
        if response.status_code == 404:
            raise self._error(response, what)
        return response.json()

    # -- the Backend protocol
    async def initialize(self) -> bool:
        state = await self._state()
        async with state.lock:
            if self._user is not None:
                return False
            answer = await self._request("GET", "/me", what=f"signing in at {self.url}")
            try:
                user = answer.json()["user"] if answer.status_code != 404 else None
            except (ValueError, KeyError, TypeError):
                user = None
            if not isinstance(user, str):
                raise RestBackendError(f"{self.url} does not look like a jobcell server: "
                                       f"GET {API}/me answered HTTP {answer.status_code} "
                                       "without a user")
            self._user = user
            return True

    async def ensure_task(self, definition: TaskDefinition) -> None:
        """Check that the server has the task's runner, in the task's version (the
        REST backend cannot register runners)."""
        version = self._runners.get(definition.name)
        if version != definition.version:      # unchecked, or changed on the server since
            answer = await self._request("GET", f"/runners/{quote(definition.name, safe='')}",
                                         what=f"looking up runner {definition.name!r}")
            if answer.status_code == 404:
                raise TaskRegistrationError(
                    f"the jobcell server at {self.url} has no runner named "
                    f"{definition.name!r}, and the REST backend cannot register runners: "
                    "install the task's runner in the server's cell (a runner definition "
                    "in its runners/ folder, or jobcell.register_runner(function, home=...) "
                    "/ a LocalBackend run of the task on that cell), then await again")
            version = str(answer.json()["version"])
            self._runners[definition.name] = version
        if version != definition.version:
            raise TaskRegistrationError(
                f"the jobcell server at {self.url} has runner {definition.name!r} in version "
                f"{version}, but the task is version {definition.version}: update the runner "
                "on the server, or use the task's matching version")

    async def stage_files(self, files: dict[str, FileRef]) -> dict[str, str]:
        return {name: await self._stage(ref) for name, ref in files.items()}

    async def _stage(self, ref: FileRef) -> str:
        if ref.execution_id and ref.step and ref.url and \
                ref.url.startswith(f"{self.url}{API}/files/"):
            # An output of a job here: copied server-side (its link may have expired).
            answer = await self._request(
                "POST", "/uploads/from-output", what=f"passing on file {ref.name!r}",
                json={"job_id": ref.execution_id, "step": ref.step, "name": ref.name})
            if answer.status_code != 404:
                return str(answer.json()["digest"])
            logger.info("file %r is no output of yours on %s any more; uploading it",
                        ref.name, self.url)
        answer = await self._request("POST", "/uploads", what=f"uploading file {ref.name!r}",
                                     body=lambda: _body(ref))
        return str(self._found(answer, f"uploading file {ref.name!r}")["digest"])

    async def submit(self, request: ExecutionRequest, *, fresh: bool) -> tuple[str, bool]:
        digests = await self.stage_files(request.files)
        spec = execution_spec(request, fresh=fresh, digests=digests)
        # Without ``fresh`` an identical job is reused, so sending again is harmless; a
        # fresh submit is sent again only when it never reached the server.
        answer = await self._request("POST", "/jobs", json=spec, resend=not fresh,
                                     what=f"submitting task {request.task_name!r}")
        body = self._found(answer, f"submitting task {request.task_name!r}")
        return str(body["job_id"]), bool(body["deduplicated"])

    async def status(self, execution_id: str) -> ExecutionStatus | None:
        answer = await self._request("GET", f"/jobs/{quote(execution_id, safe='')}",
                                     what=f"polling execution {execution_id}", forever=True)
        if answer.status_code == 404:
            return None
        body = answer.json()
        return ExecutionStatus(execution_id, body["state"], body.get("progress") or {})

    async def result(self, execution_id: str) -> ExecutionResult:
        job = f"/jobs/{quote(execution_id, safe='')}"
        what = f"fetching the result of execution {execution_id}"
        answer = self._found(await self._request("GET", f"{job}/result", what=what,
                                                 forever=True), what)
        if answer["state"] == "succeeded":
            files = {o["name"]: FileRef(name=o["name"], url=o["href"],
                                        execution_id=execution_id, step=o["step"],
                                        digest=o["blake3"], size=o["size"],
                                        expires_at=o.get("expires_at"),
                                        verify=self._verify)
                     for o in answer.get("outputs", []) if o["step"] == TASK_STEP}
            return ExecutionResult(execution_id, "succeeded", answer["result"], files=files)
        status = self._found(await self._request("GET", job, what=what, forever=True), what)
        errors = [s["error"] for s in status.get("steps", []) if s.get("error")]
        logs = self._found(await self._request("GET", f"{job}/logs", params={"last_n": 20},
                                               what=what, forever=True), what)
        tail = [line for step in logs.get("steps", [])
                for line in (*step["stderr"], *step["stdout"])]
        return ExecutionResult(execution_id, answer["state"], None,
                               answer.get("error") or "; ".join(errors) or answer["state"],
                               tail)

    async def cancel(self, execution_id: str) -> None:
        what = f"cancelling execution {execution_id}"
        self._found(await self._request("DELETE", f"/jobs/{quote(execution_id, safe='')}",
                                        what=what), what)

    # -- closing
    async def aclose(self) -> None:
        """Close the running loop's HTTP client (others close with their loops)."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.aclose()

    def close(self) -> None:
        """Close the HTTP clients of loops that are not running (outside any loop)."""
        for loop, state in list(self._loops.items()):
            if loop.is_closed():
                self._loops.pop(loop, None)
            elif not loop.is_running():
                loop.run_until_complete(state.client.aclose())
                self._loops.pop(loop, None)


__all__ = ["AuthenticationError", "RestBackend", "RestBackendError", "normalise_url"]
