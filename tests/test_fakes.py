"""The fake APNs and FCM servers behave like Apple's and Google's, as seen by the real clients.

aioapns and firebase-admin talk to the fakes over real sockets (APNs: HTTP/2 over TLS with a test
CA); a minimal raw `h2` client checks what aioapns cannot show (flow control, header checks).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import firebase_admin
import h2.config
import h2.connection
import h2.events
import h2.settings
import jwt
import pytest
from aioapns import APNs, NotificationRequest
from aioapns.connection import APNsProductionClientProtocol
from firebase_admin import credentials, exceptions, messaging

from relay.testing.fake_apns import FakeApns
from relay.testing.fake_fcm import FCM_ERRORS, GOOGLE_TOKEN_AUDIENCE, FakeFcm
from relay.testing.keys import (
    ApnsKey,
    ServiceAccount,
    make_apns_key,
    make_ca,
    make_service_account,
)

TOPIC = "com.example.app"
PROJECT = "demo-project"


# -- APNs fixtures ----------------------------------------------------------------------------

# APNs device tokens are 64 hex characters: the fake answers anything else 400 BadDeviceToken, as Apple does.
GOOD, TOK, DEAD, OTHER = "0801fc57" * 8, "a1" * 32, "dead" * 16, "b2" * 32



@pytest.fixture
def apns_key() -> ApnsKey:
    return make_apns_key()


@pytest.fixture
def fake_apns(apns_key: ApnsKey) -> Iterator[FakeApns]:
    with FakeApns([apns_key]) as fake:
        yield fake


ApnsFactory = Callable[..., APNs]


@pytest.fixture
async def make_apns(fake_apns: FakeApns, apns_key: ApnsKey) -> AsyncIterator[ApnsFactory]:
    """Build aioapns clients aimed at the fake (inside the running loop, as aioapns requires)."""
    clients: list[APNs] = []

    class ToFake(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = fake_apns.port

    def build(key: ApnsKey = apns_key, **kwargs: Any) -> APNs:
        if "client_cert" not in kwargs:
            kwargs.update(key=key.private_pem, key_id=key.key_id, team_id=key.team_id)
        client = APNs(
            topic=TOPIC, use_sandbox=False, ssl_context=fake_apns.client_ssl_context(),
            err_func=_quiet, **kwargs,
        )
        client.pool.protocol_class = ToFake
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.pool.close()
    await asyncio.sleep(0.05)  # let the TLS transports finish closing on this loop


async def _quiet(request: NotificationRequest, result: Any) -> None:
    """aioapns logs every failure at ERROR unless given an err_func; the tests expect failures."""


def _alert(token: str, notification_id: str | None = None) -> NotificationRequest:
    return NotificationRequest(
        device_token=token, message={"aps": {"alert": "hi"}}, notification_id=notification_id
    )


# -- APNs through aioapns ---------------------------------------------------------------------


async def test_fake_apns_echoes_apns_id_and_reports_unregistered(
    fake_apns: FakeApns, make_apns: ApnsFactory
) -> None:
    """A push succeeds with its apns-id echoed; a token scripted dead answers 410 Unregistered; the record
    reads from a position on."""
    apns = make_apns()
    apns_id = str(uuid.uuid4())
    fake_apns.respond(DEAD, status=410, reason="Unregistered")

    ok = await apns.send_notification(_alert(GOOD, apns_id))
    gone = await apns.send_notification(_alert(DEAD))

    assert (ok.status, ok.notification_id) == ("200", apns_id)
    assert (gone.status, gone.description) == ("410", "Unregistered")
    assert gone.timestamp is not None and abs(gone.timestamp / 1000 - time.time()) < 60
    first, second = fake_apns.requests
    assert first.headers["apns-id"] == apns_id and first.payload == {"aps": {"alert": "hi"}}
    assert first.headers["apns-topic"] == TOPIC and first.status == 200
    assert (second.status, second.reason) == (410, "Unregistered")
    assert fake_apns.requests_since(1) == [second] and fake_apns.requests_since(2) == []
    assert len(fake_apns.jwts_seen) == 1 and fake_apns.connections_opened == 1


@pytest.mark.parametrize("token", ["0801fc577294c34e0b28ad2839435945", "<7f3a9c0d 5e1b2a4c>", "z" * 64,
                                   "eJ9xQ2-fcm-registration-token:APA91bH_example"])
async def test_fake_apns_refuses_a_device_token_apple_refuses(
    fake_apns: FakeApns, make_apns: ApnsFactory, token: str
) -> None:
    """Anything but 64 hex characters gets 400 BadDeviceToken, as from Apple, so a demo cannot teach the mistake."""
    result = await make_apns().send_notification(_alert(token))

    assert (result.status, result.description) == ("400", "BadDeviceToken")


async def test_fake_apns_rejects_a_jwt_from_an_unknown_key_as_invalid_provider_token(
    fake_apns: FakeApns, make_apns: ApnsFactory
) -> None:
    """A provider token signed by a key the fake does not know gets 403 InvalidProviderToken."""
    apns = make_apns(key=make_apns_key())

    result = await apns.send_notification(_alert(GOOD))

    assert (result.status, result.description) == ("403", "InvalidProviderToken")


async def test_fake_apns_scripted_answers_expire_after_times_and_fail_all_until_recover(
    fake_apns: FakeApns, make_apns: ApnsFactory
) -> None:
    """`respond(times=1)` answers once; `fail_all` answers every token until `recover()`."""
    apns = make_apns()
    fake_apns.respond(TOK, status=429, reason="TooManyRequests", retry_after=3, times=1)

    limited = await apns.send_notification(_alert(TOK))
    then_ok = await apns.send_notification(_alert(TOK))
    fake_apns.fail_all(503, "ServiceUnavailable")
    down = await apns.send_notification(_alert(OTHER))
    fake_apns.recover()
    back = await apns.send_notification(_alert(OTHER))

    assert (limited.status, limited.description) == ("429", "TooManyRequests")
    assert [then_ok.status, down.status, back.status] == ["200", "503", "200"]
    assert down.description == "ServiceUnavailable"


async def test_fake_apns_fail_all_for_seconds_ends_by_itself(
    fake_apns: FakeApns, make_apns: ApnsFactory
) -> None:
    """`fail_all(seconds=...)` stops failing once the time is up."""
    apns = make_apns()
    fake_apns.fail_all(500, "InternalServerError", seconds=0.2)

    failed = await apns.send_notification(_alert(TOK))
    await asyncio.sleep(0.25)
    recovered = await apns.send_notification(_alert(TOK))

    assert (failed.status, recovered.status) == ("500", "200")


async def test_fake_apns_hang_then_drop_makes_aioapns_resend_on_a_new_connection(
    fake_apns: FakeApns, make_apns: ApnsFactory
) -> None:
    """A hung request stays unanswered; a dropped connection makes aioapns resend its apns-id."""
    apns = make_apns()
    fake_apns.hang(True)
    sending = asyncio.create_task(apns.send_notification(_alert(TOK, str(uuid.uuid4()))))

    (hung,) = await fake_apns.wait_for(1)
    await asyncio.sleep(0.1)
    assert not sending.done() and hung.status == 0
    fake_apns.hang(False)
    fake_apns.drop_connections()
    result = await asyncio.wait_for(sending, 2)

    assert result.status == "200"
    first, resent = fake_apns.requests
    assert first.headers["apns-id"] == resent.headers["apns-id"]
    assert (first.connection_id, resent.connection_id) == (1, 2)
    assert fake_apns.connections_opened == 2


async def test_fake_apns_set_delay_postpones_every_answer(
    fake_apns: FakeApns, make_apns: ApnsFactory
) -> None:
    """`set_delay` holds each answer back by the configured time."""
    apns = make_apns()
    await apns.send_notification(_alert("warm-up"))  # exclude the TLS handshake from the timing
    fake_apns.set_delay(0.3)

    started = time.monotonic()
    result = await apns.send_notification(_alert(TOK))

    assert result.status == "200" and time.monotonic() - started >= 0.3


async def test_fake_apns_accepts_a_client_certificate_instead_of_a_jwt(tmp_path: Path) -> None:
    """With `client_ca`, a connection authenticated by a TLS client certificate needs no JWT."""
    client_ca = make_ca()
    cert_file = client_ca.write_client_cert(tmp_path / "apns-client.pem")
    with FakeApns(client_ca=client_ca) as fake:

        class ToFake(APNsProductionClientProtocol):
            APNS_SERVER = "127.0.0.1"
            APNS_PORT = fake.port

        apns = APNs(client_cert=str(cert_file), topic=TOPIC, ssl_context=fake.client_ssl_context())
        apns.pool.protocol_class = ToFake
        try:
            result = await apns.send_notification(_alert(TOK))
        finally:
            apns.pool.close()
            await asyncio.sleep(0.05)

    assert result.status == "200"
    assert "authorization" not in fake.requests[0].headers and not fake.jwts_seen


# -- APNs through a raw h2 client -------------------------------------------------------------


@dataclass
class _Response:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False

    @property
    def status(self) -> int:
        return int(self.headers[":status"])


class RawH2Client:
    """A bare HTTP/2 client that, unlike any sane one, never acknowledges the DATA it receives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.responses: dict[int, _Response] = {}
        self.remote_settings: dict[int, int] = {}
        self.received = 0

    @classmethod
    async def open(cls, fake: FakeApns) -> RawH2Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", fake.port, ssl=fake.client_ssl_context()
        )
        client = cls(reader, writer)
        client.conn.initiate_connection()
        await client.flush()
        return client

    def post(self, path: str, headers: dict[str, str], body: bytes = b"{}") -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [(":method", "POST"), (":scheme", "https"), (":authority", "127.0.0.1"),
             (":path", path), *headers.items()],
        )
        self.conn.send_data(stream_id, body, end_stream=True)
        self.responses[stream_id] = _Response()
        return stream_id

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def read_until_quiet(self, quiet: float = 0.2) -> None:
        """Process frames until the server has sent nothing for `quiet` seconds."""
        await self.flush()
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), quiet)
            except TimeoutError:
                return
            if not data:
                return
            for event in self.conn.receive_data(data):
                self._on(event)
            await self.flush()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id:
            self.responses[event.stream_id].headers = {
                str(k): str(v) for k, v in event.headers or []
            }
        elif isinstance(event, h2.events.DataReceived) and event.stream_id and event.data:
            self.responses[event.stream_id].body += event.data
            self.received += event.flow_controlled_length or 0
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id:
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = int(change.new_value or 0)

    def acknowledge_everything(self) -> None:
        for stream_id, response in self.responses.items():
            if response.body:
                self.conn.acknowledge_received_data(len(response.body), stream_id)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def raw_h2(fake_apns: FakeApns) -> AsyncIterator[RawH2Client]:
    client = await RawH2Client.open(fake_apns)
    yield client
    await client.close()


def _bearer(key: ApnsKey, iat: float | None = None, team_id: str | None = None) -> str:
    claims = {"iss": team_id or key.team_id, "iat": int(iat if iat is not None else time.time())}
    token = jwt.encode(claims, key.private_pem, algorithm="ES256", headers={"kid": key.key_id})
    return f"bearer {token}"


async def test_fake_apns_honours_flow_control_and_stalls_a_client_that_never_acknowledges(
    fake_apns: FakeApns, raw_h2: RawH2Client, apns_key: ApnsKey
) -> None:
    """Error bodies stop at the client's 65,535-byte window and resume only after WINDOW_UPDATE."""
    reason = "R" * 4000  # big error bodies exhaust the window in a few requests
    fake_apns.respond(TOK, status=400, reason=reason)
    headers = {"apns-topic": TOPIC, "authorization": _bearer(apns_key)}
    streams = [raw_h2.post(f"/3/device/{TOK}", headers) for _ in range(20)]
    body_size = len(json.dumps({"reason": reason}, separators=(",", ":")))

    await raw_h2.read_until_quiet()
    stalled = [s for s in streams if not raw_h2.responses[s].ended]

    assert raw_h2.received == 65_535  # the default connection window, not a byte more
    assert len(stalled) == 20 - 65_535 // body_size
    raw_h2.acknowledge_everything()
    await raw_h2.read_until_quiet()
    assert all(raw_h2.responses[s].ended for s in streams)
    assert all(json.loads(raw_h2.responses[s].body)["reason"] == reason for s in streams)
    assert raw_h2.received == 20 * body_size


async def test_fake_apns_advertises_its_max_concurrent_streams(apns_key: ApnsKey) -> None:
    """The server's SETTINGS carry the configured SETTINGS_MAX_CONCURRENT_STREAMS."""
    with FakeApns([apns_key], max_concurrent_streams=7) as fake:
        client = await RawH2Client.open(fake)
        await client.read_until_quiet(0.1)
        await client.close()

    assert client.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("no-jwt", 403, "MissingProviderToken"),
        ("expired-jwt", 403, "ExpiredProviderToken"),
        ("wrong-team", 403, "InvalidProviderToken"),
        ("no-topic", 400, "MissingTopic"),
        ("bad-apns-id", 400, "BadMessageId"),
        ("too-large", 413, "PayloadTooLarge"),
    ],
)
async def test_fake_apns_rejects_bad_requests_with_apples_reasons(
    fake_apns: FakeApns, raw_h2: RawH2Client, apns_key: ApnsKey,
    case: str, status: int, reason: str,
) -> None:
    """Each malformed request gets Apple's status and JSON reason, apns-id still echoed."""
    headers = {
        "apns-topic": TOPIC, "authorization": _bearer(apns_key), "apns-id": str(uuid.uuid4()),
    }
    body = b'{"aps":{}}'
    if case == "no-jwt":
        del headers["authorization"]
    elif case == "expired-jwt":
        headers["authorization"] = _bearer(apns_key, iat=time.time() - 3700)
    elif case == "wrong-team":
        headers["authorization"] = _bearer(apns_key, team_id="OTHERTEAM1")
    elif case == "no-topic":
        del headers["apns-topic"]
    elif case == "bad-apns-id":
        headers["apns-id"] = "not-a-uuid"
    elif case == "too-large":
        body = json.dumps({"aps": {}, "pad": "x" * 4096}).encode()

    stream = raw_h2.post(f"/3/device/{TOK}", headers, body)
    await raw_h2.read_until_quiet()

    response = raw_h2.responses[stream]
    assert (response.status, json.loads(response.body)) == (status, {"reason": reason})
    assert response.headers["apns-id"] == headers["apns-id"]


async def test_fake_apns_generates_an_apns_id_when_the_request_has_none(
    raw_h2: RawH2Client, apns_key: ApnsKey
) -> None:
    """Without an apns-id header the answer carries a fresh UUID, as Apple's does."""
    stream = raw_h2.post(f"/3/device/{TOK}", {"apns-topic": TOPIC, "authorization": _bearer(apns_key)})
    await raw_h2.read_until_quiet()

    response = raw_h2.responses[stream]
    assert response.status == 200 and uuid.UUID(response.headers["apns-id"])


# -- FCM fixtures -----------------------------------------------------------------------------


@pytest.fixture
def fake_fcm() -> Iterator[FakeFcm]:
    with FakeFcm() as fake:
        yield fake


@pytest.fixture
def service_account(fake_fcm: FakeFcm) -> ServiceAccount:
    return fake_fcm.make_service_account(PROJECT)


@pytest.fixture
async def fcm_app(
    fake_fcm: FakeFcm, service_account: ServiceAccount, tmp_path: Path
) -> AsyncIterator[firebase_admin.App]:
    """A firebase-admin app whose token endpoint and FCM URL are the fake's."""
    path = service_account.write(tmp_path / "firebase.json")
    app = firebase_admin.initialize_app(credentials.Certificate(str(path)), name=uuid.uuid4().hex)
    service = messaging._get_messaging_service(app)
    service._fcm_url = fake_fcm.send_url(PROJECT)  # the only hook firebase-admin offers
    yield app
    # delete_app() closes the httpx client with asyncio.run(), which fails inside a running loop:
    # close it here on its own loop, then delete the app from a worker thread.
    await service._async_client.aclose()
    await asyncio.to_thread(firebase_admin.delete_app, app)


def _fcm_message(token: str) -> messaging.Message:
    msg = messaging.Message(
        data={"message": "hi 📷"}, android=messaging.AndroidConfig(priority="high")
    )
    msg.token = token  # the `token=` keyword is deprecated in firebase-admin 7.7 (warns)
    return msg


# -- FCM through firebase-admin ---------------------------------------------------------------


async def test_fake_fcm_records_the_message_and_reports_unregistered(
    fake_fcm: FakeFcm, fcm_app: firebase_admin.App
) -> None:
    """A send is recorded with its bearer token (readable from a position on); a token scripted dead raises
    UnregisteredError."""
    fake_fcm.respond("dead", error_code="UNREGISTERED")
    messages = [_fcm_message("alive"), _fcm_message("dead")]

    batch = await messaging.send_each_async(messages, app=fcm_app)

    ok, dead = batch.responses
    assert ok.success and ok.message_id.startswith(f"projects/{PROJECT}/messages/")
    assert isinstance(dead.exception, messaging.UnregisteredError)
    sent = {r.message["token"]: r for r in fake_fcm.requests}
    assert sent["alive"].message["data"] == {"message": "hi 📷"}
    assert sent["alive"].message["android"] == {"priority": "high"}
    assert sent["alive"].headers["authorization"].startswith("Bearer ya29.")
    assert (sent["dead"].status, sent["dead"].error_code) == (404, "UNREGISTERED")
    assert fake_fcm.token_requests == 1
    assert fake_fcm.requests_since(1) == fake_fcm.requests[1:] and len(fake_fcm.requests_since(1)) == 1


@pytest.mark.parametrize(
    ("error_code", "exception_type"),
    [
        ("SENDER_ID_MISMATCH", messaging.SenderIdMismatchError),
        ("QUOTA_EXCEEDED", messaging.QuotaExceededError),
        ("INVALID_ARGUMENT", exceptions.InvalidArgumentError),
        ("THIRD_PARTY_AUTH_ERROR", messaging.ThirdPartyAuthError),
    ],
)
async def test_fake_fcm_error_codes_map_to_firebase_admin_exceptions(
    fake_fcm: FakeFcm, fcm_app: firebase_admin.App, error_code: str, exception_type: type
) -> None:
    """Each scripted FCM error code reaches firebase-admin as its specific exception."""
    fake_fcm.respond("tok", error_code=error_code)

    batch = await messaging.send_each_async([_fcm_message("tok")], app=fcm_app)

    assert isinstance(batch.responses[0].exception, exception_type)


async def test_fake_fcm_rejects_a_revoked_access_token_and_firebase_admin_fetches_another(
    fake_fcm: FakeFcm, fcm_app: firebase_admin.App
) -> None:
    """An unknown bearer token gets 401; firebase-admin then refreshes and the resend succeeds."""
    await messaging.send_each_async([_fcm_message("a")], app=fcm_app)
    fake_fcm.revoke_tokens()

    batch = await messaging.send_each_async([_fcm_message("b")], app=fcm_app)

    assert batch.success_count == 1 and fake_fcm.token_requests == 2
    assert [r.status for r in fake_fcm.requests] == [200, 401, 200]


# -- FCM over plain HTTP ----------------------------------------------------------------------


def _assertion(
    account: ServiceAccount, audience: str = GOOGLE_TOKEN_AUDIENCE, **claims: Any
) -> str:
    now = int(time.time())
    payload = {
        "iss": account.client_email, "aud": audience, "iat": now, "exp": now + 3600,
        "scope": "https://www.googleapis.com/auth/firebase.messaging", **claims,
    }
    return jwt.encode(payload, account.info["private_key"], algorithm="RS256",
                      headers={"kid": account.info["private_key_id"]})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _grant(
    http: aiohttp.ClientSession, fake: FakeFcm, assertion: str
) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    async with http.post(fake.token_uri, data=form) as resp:
        return resp.status, await resp.json()


async def test_fake_fcm_token_endpoint_issues_tokens_for_valid_assertions_only(
    fake_fcm: FakeFcm, service_account: ServiceAccount, http: aiohttp.ClientSession
) -> None:
    """Good assertions get a Bearer token; bad signature, audience or age get invalid_grant."""
    stranger = make_service_account(fake_fcm.token_uri, PROJECT, fresh_key=True)  # unregistered
    forged = ServiceAccount({**stranger.info, "client_email": service_account.client_email}, "")
    fake_fcm.token_lifetime = 120

    ok = await _grant(http, fake_fcm, _assertion(service_account, fake_fcm.token_uri))
    bad_sig = await _grant(http, fake_fcm, _assertion(forged))
    bad_aud = await _grant(http, fake_fcm, _assertion(service_account, "https://example.com"))
    expired = await _grant(
        http, fake_fcm, _assertion(service_account, iat=int(time.time()) - 7200,
                                   exp=int(time.time()) - 3600)
    )
    unknown = await _grant(http, fake_fcm, _assertion(stranger))

    assert ok[0] == 200 and ok[1]["token_type"] == "Bearer" and ok[1]["expires_in"] == 120
    for status, body in (bad_sig, bad_aud, expired, unknown):
        assert status == 400 and body["error"] == "invalid_grant"
    assert bad_sig[1]["error_description"] == "Invalid JWT Signature."
    assert fake_fcm.token_requests == 5


@pytest.mark.parametrize("error_code", sorted(FCM_ERRORS))
async def test_fake_fcm_error_bodies_have_googles_shape(
    fake_fcm: FakeFcm, service_account: ServiceAccount, http: aiohttp.ClientSession,
    error_code: str,
) -> None:
    """Scripted errors answer google.rpc.Status with an FcmError detail and Retry-After."""
    _, grant = await _grant(http, fake_fcm, _assertion(service_account))
    fake_fcm.respond("tok", error_code=error_code, retry_after=7)
    auth = {"Authorization": f"Bearer {grant['access_token']}"}

    async with http.post(
        fake_fcm.send_url(PROJECT), json={"message": {"token": "tok"}}, headers=auth
    ) as resp:
        status, body, retry_after = resp.status, await resp.json(), resp.headers["Retry-After"]

    code, rpc_status, _ = FCM_ERRORS[error_code]
    error = body["error"]
    assert (status, error["code"], error["status"], retry_after) == (code, code, rpc_status, "7")
    assert error["details"][0] == {
        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code,
    }
    if error_code == "INVALID_ARGUMENT":
        assert error["details"][1]["fieldViolations"] == [
            {"field": "message.token", "description": "Invalid registration token"}
        ]


async def test_fake_fcm_demands_a_bearer_token_it_issued(
    fake_fcm: FakeFcm, http: aiohttp.ClientSession
) -> None:
    """Sends without an issued token get 401 UNAUTHENTICATED and are still recorded."""
    async with http.post(
        fake_fcm.send_url(PROJECT), json={"message": {"token": "tok"}},
        headers={"Authorization": "Bearer made-up"},
    ) as resp:
        status, body = resp.status, await resp.json()

    assert (status, body["error"]["status"]) == (401, "UNAUTHENTICATED")
    assert fake_fcm.requests[0].status == 401


async def test_fake_fcm_hang_never_answers_and_set_delay_postpones(
    fake_fcm: FakeFcm, service_account: ServiceAccount, http: aiohttp.ClientSession
) -> None:
    """`hang` leaves a send unanswered (recorded with status 0); `set_delay` slows answers."""
    _, grant = await _grant(http, fake_fcm, _assertion(service_account))
    auth = {"Authorization": f"Bearer {grant['access_token']}"}

    async def send() -> int:
        async with http.post(
            fake_fcm.send_url(PROJECT), json={"message": {"token": "t"}}, headers=auth,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as resp:
            return resp.status

    fake_fcm.hang(True)
    with pytest.raises(asyncio.TimeoutError):
        await send()
    fake_fcm.recover()
    fake_fcm.set_delay(0.15)
    started = time.monotonic()
    status = await send()

    assert status == 200 and time.monotonic() - started >= 0.15
    assert [r.status for r in await fake_fcm.wait_for(2)] == [0, 200]


def test_fake_fcm_wait_for_requests_times_out_with_the_count(fake_fcm: FakeFcm) -> None:
    """The blocking wait raises TimeoutError naming how many requests did arrive."""
    with pytest.raises(TimeoutError, match="got 0"):
        fake_fcm.wait_for_requests(1, timeout=0.05)


async def test_fake_fcm_plain_401_has_no_fcm_error_detail(
    fake_fcm: FakeFcm, service_account: ServiceAccount, http: aiohttp.ClientSession
) -> None:
    """`fail_all(status=401, error_code=None)` answers like Google refusing an access token: no FcmError."""
    _, grant = await _grant(http, fake_fcm, _assertion(service_account))
    fake_fcm.fail_all(status=401, error_code=None)
    async with http.post(
        fake_fcm.send_url(PROJECT), json={"message": {"token": "tok"}},
        headers={"Authorization": f"Bearer {grant['access_token']}"},
    ) as resp:
        status, body = resp.status, await resp.json()

    assert (status, body["error"]["code"], body["error"]["status"]) == (401, 401, "UNAUTHENTICATED")
    assert "details" not in body["error"]


async def test_fake_fcm_over_tls_and_the_connection_of_each_request(tmp_path: Path) -> None:
    """With `tls` the fake serves HTTPS with its CA's certificate; each request records its client address."""
    ca = make_ca()
    context = ssl.create_default_context(cafile=str(ca.write_ca_pem(tmp_path / "ca.pem")))
    with FakeFcm(tls=ca) as fake:
        connector = aiohttp.TCPConnector(ssl=context, limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(3):
                async with session.post(fake.send_url(PROJECT), json={"message": {"token": "t"}}) as resp:
                    assert resp.status == 401  # no token: but answered over TLS
        requests = fake.requests
    assert fake.url.startswith("https://127.0.0.1:")
    (peer,) = {r.peer for r in requests}  # one kept-alive connection carried the three requests
    host, port = peer.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) not in (0, fake.port)
