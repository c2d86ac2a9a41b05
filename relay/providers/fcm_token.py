"""The FCM provider's OAuth access token: fetched by google-auth on the credential's own thread, one at a time.

google-auth refreshes a service account's token with a blocking ``requests`` call, so it runs off the event loop.
Three rules keep that from hurting the rest of the relay (issue 17.6):

* **one refresh per credential, shared**: every send that needs a token awaits the same refresh through
  ``asyncio.shield``; a send that times out stops waiting, the refresh goes on, and the next send joins it instead
  of starting another (the lock it replaced was released by the timeout while the thread ran on);
* **its own thread**: a single-thread executor per credential, never the loop's default executor, which
  ``getaddrinfo`` (every provider's DNS lookups) and ``asyncio.to_thread`` share;
* **a short, explicit timeout** on the token request (google-auth's default is 120 s per attempt):
  :data:`TOKEN_REQUEST_TIMEOUT`, so a hung token endpoint frees the thread and is retried.
"""

from __future__ import annotations

import asyncio
import datetime
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests

from relay.outcome import SendResult
from relay.providers.fcm_errors import classify_refresh

REFRESH_AHEAD = 300.0  # seconds before expiry; google-auth itself would refresh (blocking) at 225 s
TOKEN_REQUEST_TIMEOUT = 10.0  # seconds for Google's token endpoint to answer (connect, and each read)


class _TokenRequest(google.auth.transport.requests.Request):
    """google-auth's requests transport with our timeout and, when the app names one, our proxy."""

    def __init__(self, timeout: float, proxy: str | None) -> None:
        super().__init__(requests.Session())
        self._timeout = timeout
        self._proxies = {"http": proxy, "https": proxy} if proxy else None

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: Any = None, **kwargs: Any) -> Any:
        if self._proxies is not None:
            kwargs.setdefault("proxies", self._proxies)  # per request: requests lets the environment win otherwise
        return super().__call__(url, method, body, headers, timeout=self._timeout, **kwargs)  # type: ignore[no-untyped-call]


class TokenKeeper:
    """Keeps one service account's OAuth token fresh; ``header`` is ``"Bearer <token>"`` once one was fetched."""

    def __init__(self, credential: Any, name: str, token_uri: str, *, timeout: float = TOKEN_REQUEST_TIMEOUT,
                 proxy: str | None = None) -> None:
        self._credential = credential
        self._request = _TokenRequest(timeout, proxy)
        self._timeout = timeout
        endpoint = urllib.parse.urlsplit(token_uri)
        self._token_host = endpoint.hostname or token_uri
        self._token_port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fcm-token-{name}")
        self._refreshing: asyncio.Task[SendResult | None] | None = None
        self._fresh_until = 0.0  # monotonic: until then the token needs no look
        self.header = ""
        self.refreshes = 0
        self.last_error: SendResult | None = None

    def _expires_in(self) -> float:
        expiry = self._credential.expiry  # naive UTC datetime, per google-auth
        if not self._credential.token or expiry is None:
            return 0.0
        return float((expiry - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).total_seconds())

    def _join(self) -> asyncio.Future[SendResult | None]:
        """The refresh in progress, or a new one; shielded, so a caller's cancellation never stops it."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return asyncio.shield(self._refreshing)

    async def ensure(self) -> SendResult | None:
        """Refresh when the token is missing or near expiry; returns the failure, if any."""
        if time.monotonic() < self._fresh_until:
            return None
        if self.header and self._expires_in() > REFRESH_AHEAD:
            return None
        return await self._join()

    async def refresh_rejected(self, rejected: str) -> SendResult | None:
        """FCM refused the bearer header ``rejected`` (401): refresh, unless another send already did."""
        if self.header != rejected and (self._refreshing is None or self._refreshing.done()):
            return None
        return await self._join()

    async def _refresh(self) -> SendResult | None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._credential.refresh, self._request)
        except (google.auth.exceptions.GoogleAuthError, OSError, ValueError) as exc:
            self.last_error = classify_refresh(exc, self._token_host, self._token_port, self._timeout)
            return self.last_error
        self.refreshes += 1
        self.last_error = None
        self.header = f"Bearer {self._credential.token}"
        self._fresh_until = time.monotonic() + self._expires_in() - REFRESH_AHEAD
        return None

    async def run(self) -> None:
        """Background loop: refresh ahead of expiry, back off on failure."""
        while True:
            failure = await self.ensure()
            wait = 30.0 if failure else max(5.0, self._expires_in() - REFRESH_AHEAD)
            await asyncio.sleep(wait)

    def close(self) -> None:
        """Stop: a refresh still running finishes on its thread (bounded by the timeout), then the thread ends."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._request.session.close()
