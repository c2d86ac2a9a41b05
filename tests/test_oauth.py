"""OAuth 2.0 client credentials (SPEC §3, RFC 6749 §4.4 and §5): the token endpoint, bearer tokens on the
webhook (signed, expiring, stateless across instances, rotating keys), and their configuration."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest

from relay.config import OAuthSettings, load_config
from relay.errors import ConfigError
from relay.inbound.oauth import AUDIENCE, InvalidToken, TokenAuthority
from relay.runtime.relay import reload
from relay.testing.sandbox import IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay, RelayUnderTest

CLIENT_ID = "parley"
CLIENT_SECRET = "client-secret-9c4f0e7d1b2a6e83"
SIGNING_SECRET = "token-signing-secret-" + "k" * 24
OLD_SIGNING_SECRET = "old-token-signing-secret-" + "o" * 24


def oauth_config(**kw: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "clients": {CLIENT_ID: {"secret_sha256": hashlib.sha256(CLIENT_SECRET.encode()).hexdigest(),
                                "scopes": ["push", "admin"]}},
        "signing_secret": SIGNING_SECRET,
        "token_ttl": 600,
        "issuer": "https://relay.example.com",
    }
    config.update(kw)
    return config


async def relay_with_oauth(make_relay: MakeRelay, name: str = "relay.yaml", **kw: Any) -> RelayUnderTest:
    return await make_relay(name=name, auth={"oauth": oauth_config(**kw)})


def settings_of(r: RelayUnderTest) -> OAuthSettings:
    oauth = r.relay.config.auth.oauth
    assert oauth is not None
    return oauth


async def token_request(r: RelayUnderTest, form: dict[str, str] | None = None, *, basic: tuple[str, str] | None = (
        CLIENT_ID, CLIENT_SECRET), path: str = "/oauth/token") -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    headers = {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
    response = await r.client.post(path, data=form if form is not None else {"grant_type": "client_credentials"},
                                   headers=headers)
    return response.status, await response.json(), response


async def webhook_with_token(r: RelayUnderTest, token: str, doc: Any = None) -> tuple[int, Any]:
    return await r.post(doc or sample("message"), headers={"Authorization": f"Bearer {token}"}, auth=False)


# -- the token endpoint -----------------------------------------------------------------------------------


async def test_basic_auth_token_request_returns_bearer_token_not_cached(make_relay: MakeRelay) -> None:
    """Basic auth + grant_type=client_credentials -> 200 {access_token, Bearer, expires_in}, no-store."""
    r = await relay_with_oauth(make_relay)
    status, body, response = await token_request(r)
    assert status == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600 and body["scope"] == "push admin"
    assert response.headers["Cache-Control"] == "no-store" and response.headers["Pragma"] == "no-cache"
    claims = jwt.decode(body["access_token"], SIGNING_SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["sub"] == CLIENT_ID and claims["iss"] == "https://relay.example.com"
    assert claims["exp"] - claims["iat"] == 600


async def test_form_credentials_and_requested_scope(make_relay: MakeRelay) -> None:
    """client_id/client_secret in the form work too; a requested subset of scopes is what is granted."""
    r = await relay_with_oauth(make_relay)
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "scope": "push"}
    status, body, _ = await token_request(r, form, basic=None)
    assert (status, body["scope"]) == (200, "push")


async def test_url_encoded_basic_credentials_per_rfc6749_2_3_1(make_relay: MakeRelay) -> None:
    """Basic credentials that are form-urlencoded first (as §2.3.1 says) are decoded before checking."""
    secret = "s3cret+with/special=chars&more"
    r = await make_relay(auth={"oauth": oauth_config(clients={"parley": {
        "secret_sha256": hashlib.sha256(secret.encode()).hexdigest()}})})
    encoded = "parley:" + secret.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D").replace("&", "%26")
    response = await r.client.post("/oauth/token", data={"grant_type": "client_credentials"},
                                   headers={"Authorization": "Basic " + base64.b64encode(encoded.encode()).decode()})
    assert response.status == 200
    assert (await token_request(r, basic=("parley", secret)))[0] == 200  # and unencoded, as many clients send


async def test_wrong_client_secret_is_401_invalid_client_with_www_authenticate(make_relay: MakeRelay) -> None:
    """A wrong secret, an unknown client, or no credentials: 401 invalid_client, WWW-Authenticate Basic."""
    r = await relay_with_oauth(make_relay)
    attempts: list[tuple[dict[str, str] | None, tuple[str, str] | None]] = [
        (None, (CLIENT_ID, "wrong-secret")),
        (None, ("stranger", CLIENT_SECRET)),
        (None, None),
        ({"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET[:-1]}, None),
    ]
    for form, basic in attempts:
        status, body, response = await token_request(r, form, basic=basic)
        assert status == 401 and body["error"] == "invalid_client", (form, basic, body)
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert response.headers["Cache-Control"] == "no-store"
        assert "access_token" not in body


async def test_unsupported_grant_and_missing_grant(make_relay: MakeRelay) -> None:
    """grant_type password -> 400 unsupported_grant_type; no grant_type -> 400 invalid_request."""
    r = await relay_with_oauth(make_relay)
    status, body, _ = await token_request(r, {"grant_type": "password", "username": "u", "password": "p"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    status, body, _ = await token_request(r, {"scope": "push"})
    assert (status, body["error"]) == (400, "invalid_request")


async def test_scope_not_granted_to_the_client_is_invalid_scope(make_relay: MakeRelay) -> None:
    """A scope outside the client's list -> 400 invalid_scope, and no token."""
    r = await relay_with_oauth(make_relay)
    status, body, _ = await token_request(r, {"grant_type": "client_credentials", "scope": "push root"})
    assert (status, body["error"]) == (400, "invalid_scope") and "access_token" not in body


async def test_malformed_token_requests_are_invalid_request(make_relay: MakeRelay) -> None:
    """Two authentication methods at once, a repeated parameter, bad Basic or a non-form body: 400."""
    r = await relay_with_oauth(make_relay)
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    assert (await token_request(r, form))[1]["error"] == "invalid_request"
    for body, headers in ((b"grant_type=client_credentials&grant_type=client_credentials", {}),
                          (b"grant_type=client_credentials", {"Authorization": "Basic !!!"}),
                          (b"\xff\xfe", {}), (b"[1, 2]", {"Content-Type": "application/json"})):
        headers = {"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET), **headers}
        response = await r.client.post("/oauth/token", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", **headers})
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"


async def test_json_token_request_from_lenient_clients(make_relay: MakeRelay) -> None:
    """A JSON object body with the same fields is accepted (some clients send JSON)."""
    r = await relay_with_oauth(make_relay)
    response = await r.client.post("/oauth/token", json={"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                                        "client_secret": CLIENT_SECRET})
    assert response.status == 200


async def test_get_on_the_token_endpoint_is_a_json_405(make_relay: MakeRelay) -> None:
    """RFC 6749 §3.2 requires POST: GET is refused with a JSON error."""
    r = await relay_with_oauth(make_relay)
    response = await r.client.get("/oauth/token")
    assert response.status == 405 and (await response.json())["status"] == "error"


async def test_failed_client_authentications_are_rate_limited(make_relay: MakeRelay) -> None:
    """After N failed client authentications from one address, 429; the right secret still gets a token."""
    r = await make_relay(auth={"oauth": oauth_config(), "rate_limit": {"max_failures": 2}})
    statuses = [(await token_request(r, basic=(CLIENT_ID, "guess")))[0] for _ in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert (await token_request(r))[0] == 200


# -- bearer tokens on the webhook -------------------------------------------------------------------------


async def test_webhook_requires_a_valid_bearer_token(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """With auth.oauth the webhook needs a bearer token: none -> 401 + WWW-Authenticate; a token -> 200."""
    r = await relay_with_oauth(make_relay)
    response = await r.client.post("/parley/webhook", json=sample("message"))
    assert response.status == 401 and response.headers["WWW-Authenticate"] == 'Bearer realm="parley-relay"'
    assert (await response.json())["error"] == "authentication failed"
    token = (await token_request(r))[1]["access_token"]
    assert (await webhook_with_token(r, token))[0] == 200
    (request,) = await sandbox.apns.wait_for(1)
    assert request.device_token == IOS_TOKEN
    response = await r.client.post("/parley/webhook", json=sample("message"), headers={"Authorization": "Basic eA=="})
    assert response.status == 401


async def test_expired_bearer_token_is_refused(make_relay: MakeRelay) -> None:
    """A token whose lifetime (plus 30 s skew leeway) has passed gets 401 error=invalid_token."""
    r = await relay_with_oauth(make_relay)
    past = TokenAuthority(settings_of(r), clock=lambda: time.time() - 600 - 31)
    expired = past.mint(CLIENT_ID, ("push",)).access_token
    response = await r.client.post("/parley/webhook", json=sample("message"),
                                   headers={"Authorization": f"Bearer {expired}"})
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    with pytest.raises(InvalidToken, match="expired"):
        TokenAuthority(settings_of(r)).verify(expired)
    fresh = TokenAuthority(settings_of(r), clock=lambda: time.time() - 500).mint(CLIENT_ID, ()).access_token
    assert (await webhook_with_token(r, fresh))[0] == 200  # 500 s old with a 600 s lifetime: still fine


async def test_token_signed_with_another_key_is_refused(make_relay: MakeRelay) -> None:
    """Same claims and kid but another secret: 401; an unknown kid: 401."""
    r = await relay_with_oauth(make_relay)
    good = (await token_request(r))[1]["access_token"]
    header = jwt.get_unverified_header(good)
    claims = jwt.decode(good, options={"verify_signature": False})
    forged = jwt.encode(claims, "attacker-chosen-secret-" + "x" * 20, algorithm="HS256", headers={"kid": header["kid"]})
    assert (await webhook_with_token(r, forged))[0] == 401
    unknown_kid = jwt.encode(claims, SIGNING_SECRET, algorithm="HS256", headers={"kid": "other"})
    assert (await webhook_with_token(r, unknown_kid))[0] == 401
    tampered = good.rsplit(".", 1)[0] + "." + good.rsplit(".", 1)[1][::-1]
    assert (await webhook_with_token(r, tampered))[0] == 401


def _b64(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


async def test_alg_none_and_other_algorithms_are_refused(make_relay: MakeRelay) -> None:
    """``alg: none`` (with or without a signature), HS512 and RS256 headers are refused before any check."""
    r = await relay_with_oauth(make_relay)
    good = (await token_request(r))[1]["access_token"]
    kid = jwt.get_unverified_header(good)["kid"]
    claims = jwt.decode(good, options={"verify_signature": False})
    for alg in ("none", "None", "NONE"):
        unsigned = f"{_b64({'alg': alg, 'typ': 'JWT', 'kid': kid})}.{_b64(claims)}."
        assert (await webhook_with_token(r, unsigned))[0] == 401, alg
    keep_sig = f"{_b64({'alg': 'none', 'kid': kid})}.{_b64(claims)}.{good.rsplit('.', 1)[1]}"
    assert (await webhook_with_token(r, keep_sig))[0] == 401
    hs512 = jwt.encode(claims, SIGNING_SECRET + "x" * 40, algorithm="HS512", headers={"kid": kid})
    assert (await webhook_with_token(r, hs512))[0] == 401
    with pytest.raises(InvalidToken, match="algorithm"):
        TokenAuthority(settings_of(r)).verify(f"{_b64({'alg': 'RS256', 'kid': kid})}.{_b64(claims)}.c2ln")


async def test_tokens_for_another_audience_issuer_or_client_are_refused() -> None:
    """Correctly signed tokens with a foreign aud or iss, or for a client no longer configured, fail."""
    settings = OAuthSettings({CLIENT_ID: _client()}, (("k1", SIGNING_SECRET.encode()),), issuer="me")
    authority = TokenAuthority(settings)
    now = int(time.time())
    base = {"iss": "me", "aud": AUDIENCE, "sub": CLIENT_ID, "iat": now, "exp": now + 60}
    for change in ({"aud": "someone-else"}, {"iss": "them"}, {"sub": "removed-client"}):
        token = jwt.encode({**base, **change}, SIGNING_SECRET, algorithm="HS256", headers={"kid": "k1"})
        with pytest.raises(InvalidToken):
            authority.verify(token)
    no_exp = {k: v for k, v in base.items() if k != "exp"}
    with pytest.raises(InvalidToken):
        authority.verify(jwt.encode(no_exp, SIGNING_SECRET, algorithm="HS256", headers={"kid": "k1"}))
    authority.verify(jwt.encode(base, SIGNING_SECRET, algorithm="HS256", headers={"kid": "k1"}))


def _client(scopes: tuple[str, ...] = ("push",)) -> Any:
    from relay.config import OAuthClient

    return OAuthClient(hashlib.sha256(CLIENT_SECRET.encode()).digest(), scopes)


async def test_required_scope_is_enforced_on_the_webhook(make_relay: MakeRelay) -> None:
    """With required_scope push, a token granted only 'admin' is refused and one with 'push' passes."""
    r = await relay_with_oauth(make_relay, required_scope="push")
    admin = (await token_request(r, {"grant_type": "client_credentials", "scope": "admin"}))[1]["access_token"]
    push = (await token_request(r, {"grant_type": "client_credentials", "scope": "push"}))[1]["access_token"]
    assert (await webhook_with_token(r, admin))[0] == 401
    assert (await webhook_with_token(r, push))[0] == 200


async def test_every_instance_accepts_every_instances_tokens(make_relay: MakeRelay) -> None:
    """Two relays with the same config share no state, yet each accepts the other's tokens."""
    a = await relay_with_oauth(make_relay, name="a.yaml")
    b = await relay_with_oauth(make_relay, name="b.yaml")
    token = (await token_request(a))[1]["access_token"]
    assert (await webhook_with_token(b, token))[0] == 200


async def test_signing_key_rotation_keeps_old_tokens_valid(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """After rotating, tokens of the previous key still pass while new ones are signed with the new key."""
    (sandbox.root / "signing-old.key").write_text(OLD_SIGNING_SECRET + "\n")
    before = await make_relay(name="before.yaml", auth={"oauth": oauth_config(
        signing_secret=None, signing_keys=[{"id": "2024", "secret_file": "signing-old.key"}])})
    old_token = (await token_request(before))[1]["access_token"]
    after = await make_relay(name="after.yaml", auth={"oauth": oauth_config(
        signing_keys=[{"id": "2024", "secret_file": "signing-old.key"}])})
    new_token = (await token_request(after))[1]["access_token"]
    assert jwt.get_unverified_header(old_token)["kid"] == "2024"
    assert jwt.get_unverified_header(new_token)["kid"] != "2024"
    assert (await webhook_with_token(after, old_token))[0] == 200
    assert (await webhook_with_token(after, new_token))[0] == 200
    assert (await webhook_with_token(before, new_token))[0] == 401  # the old config never knew the new key


async def test_static_headers_and_bearer_must_both_pass(make_relay: MakeRelay) -> None:
    """With auth.headers and auth.oauth, a valid token without the header (or vice versa) is refused."""
    from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE

    r = await make_relay(auth={"headers": {AUTH_HEADER: AUTH_VALUE}, "oauth": oauth_config()})
    token = (await token_request(r))[1]["access_token"]
    assert (await webhook_with_token(r, token))[0] == 401
    assert (await r.post(sample("message")))[0] == 401
    assert (await r.post(sample("message"), headers={"Authorization": f"Bearer {token}"}))[0] == 200


# -- configuration ----------------------------------------------------------------------------------------


def test_client_secret_file_is_kept_hashed(sandbox: Sandbox) -> None:
    """secret_file is read once and only its SHA-256 is kept in the loaded configuration."""
    (sandbox.root / "parley.secret").write_text(CLIENT_SECRET + "\n")
    path = sandbox.write(auth={"oauth": oauth_config(clients={"parley": {"secret_file": "parley.secret"}})})
    oauth = load_config(path).auth.oauth
    assert oauth is not None
    assert oauth.clients["parley"].secret_sha256 == hashlib.sha256(CLIENT_SECRET.encode()).digest()
    assert CLIENT_SECRET not in repr(oauth) and SIGNING_SECRET not in repr(oauth)


@pytest.mark.parametrize(("oauth", "key", "message"), [
    (oauth_config(signing_secret="short"), "auth.oauth.signing_secret", "at least 32 bytes"),
    (oauth_config(signing_secret=None), "auth.oauth.signing_secret_file", "give signing_secret"),
    (oauth_config(clients={}), "auth.oauth.clients", "at least one client"),
    (oauth_config(clients={"parley": {"secret_sha256": "abc"}}), "auth.oauth.clients.parley.secret_sha256",
     "64 hex characters"),
    (oauth_config(clients={"parley": {}}), "auth.oauth.clients.parley.secret_sha256", "exactly one of"),
    (oauth_config(clients={"par:ley": {"secret_sha256": "a" * 64}}), "auth.oauth.clients.par:ley", "client id"),
    (oauth_config(clients={"parley": {"secret_sha256": "a" * 64, "scopes": ["two words"]}}),
     "auth.oauth.clients.parley.scopes[0]", "scope name"),
    (oauth_config(path="/parley/webhook"), "auth.oauth.path", "differ from webhook.path"),
    (oauth_config(required_scope="push2"), "auth.oauth.required_scope", "no client has the scope"),
    (oauth_config(token_ttl=0), "auth.oauth.token_ttl", "at least"),
    (oauth_config(signing_keys=[{"id": "a", "secret": "x" * 40}, {"id": "a", "secret": "y" * 40}]),
     "auth.oauth.signing_keys", "unique"),
    (oauth_config(client_secret="x"), "auth.oauth.client_secret", "unknown key"),
])
def test_oauth_config_problems_name_file_and_key(sandbox: Sandbox, oauth: dict[str, Any], key: str,
                                                 message: str) -> None:
    """Each mistake in ``auth.oauth`` is reported with the config file and the dotted key."""
    path = sandbox.write(auth={"oauth": {k: v for k, v in oauth.items() if v is not None}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.file == str(path) and p.key == key and message in p.message for p in info.value.problems), \
        info.value.problems


async def test_reload_can_enable_oauth_without_a_restart(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Before: /oauth/token is a JSON 404. After a reload that adds auth.oauth: tokens, and bearer required."""
    from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE

    r = await make_relay()
    status, body, _ = await token_request(r)
    assert (status, body["error"]) == (404, "invalid_request")
    sandbox.write(auth={"headers": {AUTH_HEADER: AUTH_VALUE}, "oauth": oauth_config()})
    assert await reload(r.relay)
    assert (await r.post(sample("message")))[0] == 401  # the header alone no longer suffices
    token = (await token_request(r))[1]["access_token"]
    assert (await r.post(sample("message"), headers={"Authorization": f"Bearer {token}"}))[0] == 200
