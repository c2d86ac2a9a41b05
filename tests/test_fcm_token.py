"""The FCM OAuth token: one shared refresh per credential, on its own thread, with a short timeout."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid

from relay.config import FcmApp, load_config
from relay.outcome import Outcome
from relay.providers import Bounded
from relay.providers.fcm import FcmProvider
from relay.push import FcmPush
from relay.testing.sandbox import Sandbox
from tests.conftest import wait_until


def _push(i: int) -> FcmPush:
    return FcmPush("android", f"tok-{i}-" + "t" * 40, str(uuid.uuid4()), "t", "b", None, {"parley": "{}"}, "high",
                   None, None, None)


async def test_fcm_hung_token_endpoint_holds_one_refresh_on_its_own_thread_until_its_short_timeout(
        sandbox: Sandbox) -> None:
    """Google's token endpoint hangs: 30 sends time out while exactly one token request is open (they all wait on
    the same refresh), the loop's default executor stays free for DNS lookups and to_thread (here it has a single
    worker, which a refresh run there would hold for its whole 6 s), and the refresh gives up after its own timeout
    (6 s here, not google-auth's 120 s); no second token request was queued behind it."""
    app = load_config(sandbox.write()).apps["android"]
    assert isinstance(app, FcmApp)
    loop = asyncio.get_running_loop()
    default = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="default")
    loop.set_default_executor(default)
    sandbox.fcm.token_delay = 3600  # hangs (cancelled when the client gives up)
    fcm = await FcmProvider.create(app, timeout=10, token_timeout=6.0)
    provider = Bounded(fcm, concurrency=50, timeout=0.1)
    try:
        await wait_until(lambda: sandbox.fcm.token_requests_in_flight == 1)
        results = await asyncio.gather(*(provider.send(_push(i)) for i in range(30)))
        assert sandbox.fcm.token_requests_in_flight == 1  # the one refresh is still hanging
        # The default executor, which resolves every host name, still works at once (well before the 6 s).
        async with asyncio.timeout(3):
            assert await loop.run_in_executor(None, lambda: "free") == "free"
            assert await loop.getaddrinfo("localhost", 443)
        async with asyncio.timeout(60):  # 6 s, generously; google-auth's own default would be 120 s
            failure = await fcm.tokens.ensure()
    finally:
        sandbox.fcm.token_delay = 0
        await provider.close()
    assert {r.outcome for r in results} == {Outcome.RETRY}
    assert all("timeout" in r.reason for r in results)
    assert (sandbox.fcm.token_requests_peak, sandbox.fcm.token_requests) == (1, 1)
    assert failure is not None and failure.outcome is Outcome.RETRY
    assert failure.reason == f"OAuth token refresh failed: no answer from 127.0.0.1:{sandbox.fcm.port} within 6s"


async def test_fcm_sends_after_a_refresh_gave_up_get_a_token_once_the_endpoint_answers(sandbox: Sandbox) -> None:
    """After a refresh timed out, the next send starts a new one (the thread was freed) and goes through."""
    app = load_config(sandbox.write()).apps["android"]
    assert isinstance(app, FcmApp)
    sandbox.fcm.token_delay = 3600
    fcm = await FcmProvider.create(app, timeout=10, token_timeout=0.5)
    try:
        failed = await fcm.send(_push(1))
        sandbox.fcm.token_delay = 0
        sent = await fcm.send(_push(2))
    finally:
        sandbox.fcm.token_delay = 0
        await fcm.close()
    assert failed.outcome is Outcome.RETRY and "within 0.5s" in failed.reason
    assert sent.outcome is Outcome.SENT
    assert sandbox.fcm.token_requests_peak == 1
