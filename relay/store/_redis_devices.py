"""The device half of the Redis store: run-time devices, dead marks, learned APNs environments, and the
device epoch with its change log that keeps every process and every instance current.

Keys (``P`` is the prefix)::

    P:devices        hash: Parley token -> {"app", "device_token", "environment"?, "updated_at"} (JSON)
    P:deadtok        hash: dead Parley token -> the provider's reason
    P:apnsenv        hash: APNs device token -> environment found by a sandbox fallback
    P:device:epoch   counter: bumped by every change of the three hashes, in the same script
    P:device:changes zset: "d:<token>" / "x:<token>" / "e:<device token>" -> epoch of its latest change

Each change is one script (a device write is a compare-and-set on the entry it was decided against, so a
scope decision made in Python holds against concurrent writers: on a lost race it is decided again). A reader
that last saw epoch ``e`` reads the keys scored above ``e`` and their values now in one script; a reader more
than :data:`CHANGE_LOG_KEEP` epochs behind reads everything in one ``MULTI``.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio.client import Redis

from relay.config.model import ApnsEnvironment
from relay.errors import StoreError
from relay.registry.device import Device, as_environment
from relay.registry.scope import DevicePut, Removal, Scope, removal
from relay.store.base import CHANGE_LOG_KEEP, DeviceChanges

CAS_TRIES = 20  # a device written by someone else between our read and our write: decide again, this often

_CHANGED = f"""
local P = ARGV[1]
local function changed(...)
  local epoch = redis.call('INCR', P .. ':device:epoch')
  for _, name in ipairs({{...}}) do redis.call('ZADD', P .. ':device:changes', epoch, name) end
  if epoch > {CHANGE_LOG_KEEP} then
    redis.call('ZREMRANGEBYSCORE', P .. ':device:changes', '-inf', epoch - {CHANGE_LOG_KEEP})
  end
end
"""
# ARGV: P, token, new JSON ('' = remove), expected JSON ('' = no entry). 0 when the entry is not as expected.
DEVICE_CAS = _CHANGED + """
local token, new, expected = ARGV[2], ARGV[3], ARGV[4]
local now = redis.call('HGET', P .. ':devices', token) or ''
if now ~= expected then return 0 end
if new == '' then
  redis.call('HDEL', P .. ':devices', token)
  changed('d:' .. token)
else
  redis.call('HSET', P .. ':devices', token, new)
  redis.call('HDEL', P .. ':deadtok', token)
  changed('d:' .. token, 'x:' .. token)
end
return 1
"""
# ARGV: P, token, reason. 1 when the token was not dead before.
MARK_DEAD = _CHANGED + """
if redis.call('HSETNX', P .. ':deadtok', ARGV[2], ARGV[3]) == 0 then return 0 end
changed('x:' .. ARGV[2])
return 1
"""
# ARGV: P, device token, environment.
REMEMBER_ENV = _CHANGED + """
if redis.call('HGET', P .. ':apnsenv', ARGV[2]) == ARGV[3] then return 0 end
redis.call('HSET', P .. ':apnsenv', ARGV[2], ARGV[3])
changed('e:' .. ARGV[2])
return 1
"""
# ARGV: P, since. {epoch} alone when the log does not reach back (read everything), else {epoch, key, value...}.
CHANGES = f"""
local P = ARGV[1]
local since = tonumber(ARGV[2])
local epoch = tonumber(redis.call('GET', P .. ':device:epoch') or '0')
if since > epoch or since < epoch - {CHANGE_LOG_KEEP} then return {{epoch}} end
local out = {{epoch, 'delta'}}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', P .. ':device:changes', '(' .. since, '+inf')) do
  local kind, rest = string.sub(name, 1, 2), string.sub(name, 3)
  local value = false
  if kind == 'd:' then value = redis.call('HGET', P .. ':devices', rest)
  elseif kind == 'x:' then value = tostring(redis.call('HEXISTS', P .. ':deadtok', rest))
  elseif kind == 'e:' then value = redis.call('HGET', P .. ':apnsenv', rest) end
  out[#out + 1] = name
  out[#out + 1] = value or ''
end
return out
"""
SCRIPTS = ("DEVICE_CAS", "MARK_DEAD", "REMEMBER_ENV", "CHANGES")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _device(token: str, raw: bytes | str) -> Device:
    """A run-time device from its ``P:devices`` JSON (``environment`` absent in entries of earlier versions)."""
    doc = json.loads(raw)
    return Device(token, str(doc["app"]), str(doc["device_token"]), as_environment(doc.get("environment")))


def _doc(device: Device, now: float) -> str:
    doc: dict[str, object] = {"app": device.app, "device_token": device.device_token, "updated_at": now}
    if device.environment is not None:
        doc["environment"] = device.environment
    return json.dumps(doc)


class RedisDevices:
    """Device operations of the Redis store (a mixin: the store provides the client, ``_do`` and ``_script``)."""

    @property
    def _client(self) -> Redis:
        raise NotImplementedError  # provided by RedisStore

    async def _do(self, call: Any) -> Any:
        raise NotImplementedError  # provided by RedisStore: one redis call, its errors translated

    async def _script(self, name: str, *args: Any) -> Any:
        raise NotImplementedError  # provided by RedisStore: a registered script, the prefix first

    def _key(self, name: str) -> str:
        raise NotImplementedError  # provided by RedisStore

    async def _entry(self, token: str) -> tuple[str, Device | None]:
        raw = await self._do(self._client.hget(self._key("devices"), token))
        return ("", None) if raw is None else (_s(raw), _device(token, raw))

    async def put_device(self, device: Device, now: float, scope: Scope | None = None) -> DevicePut:
        for _ in range(CAS_TRIES):
            raw, stored = await self._entry(device.token)
            decided = device if scope is None else scope.decide(device, stored)
            if not isinstance(decided, Device):
                return DevicePut(None, stored, decided)
            if await self._script("DEVICE_CAS", decided.token, _doc(decided, now), raw):
                return DevicePut(decided, stored)
        raise StoreError(f"device {device.token[:12]}… kept changing under {CAS_TRIES} writes; retry")

    async def remove_device(self, token: str, scope: Scope | None = None) -> Removal:
        for _ in range(CAS_TRIES):
            raw, stored = await self._entry(token)
            decided = removal(stored, scope)
            if decided is not Removal.REMOVED or await self._script("DEVICE_CAS", token, "", raw):
                return decided
        raise StoreError(f"device {token[:12]}… kept changing under {CAS_TRIES} writes; retry")

    async def get_device(self, token: str) -> Device | None:
        return (await self._entry(token))[1]

    async def list_devices(self) -> list[Device]:
        rows = await self._do(self._client.hgetall(self._key("devices")))
        return sorted((_device(_s(token), raw) for token, raw in rows.items()), key=lambda d: d.token)

    async def remember_environment(self, device_token: str, environment: ApnsEnvironment, now: float) -> None:
        await self._script("REMEMBER_ENV", device_token, environment)

    async def learned_environments(self) -> dict[str, ApnsEnvironment]:
        rows = await self._do(self._client.hgetall(self._key("apnsenv")))
        return {_s(token): env for token, value in rows.items() if (env := as_environment(_s(value))) is not None}

    async def mark_dead(self, token: str, reason: str, now: float) -> bool:
        return bool(await self._script("MARK_DEAD", token, reason))

    async def dead_tokens(self) -> dict[str, str]:
        rows = await self._do(self._client.hgetall(self._key("deadtok")))
        return {_s(token): _s(reason) for token, reason in rows.items()}

    async def device_epoch(self) -> int:
        return int(await self._do(self._client.get(self._key("device:epoch"))) or 0)

    async def device_changes(self, since: int | None) -> DeviceChanges:
        if since is not None:
            reply = await self._script("CHANGES", str(since))
            if len(reply) > 1:
                return _delta(int(reply[0]), reply[2:])
        async with self._client.pipeline(transaction=True) as pipe:  # MULTI: one snapshot of all four keys
            pipe.get(self._key("device:epoch"))
            pipe.hgetall(self._key("devices"))
            pipe.hkeys(self._key("deadtok"))
            pipe.hgetall(self._key("apnsenv"))
            epoch, devices, dead, environments = await self._do(pipe.execute())
        return DeviceChanges(
            int(epoch or 0), True,
            {_s(token): _device(_s(token), raw) for token, raw in devices.items()},
            {_s(token): True for token in dead},
            {_s(token): as_environment(_s(value)) for token, value in environments.items()},
        )


def _delta(epoch: int, flat: list[Any]) -> DeviceChanges:
    devices: dict[str, Device | None] = {}
    dead: dict[str, bool] = {}
    environments: dict[str, ApnsEnvironment | None] = {}
    for name, value in zip(flat[::2], flat[1::2], strict=True):
        key, raw = _s(name), _s(value)
        kind, rest = key[:2], key[2:]
        if kind == "d:":
            devices[rest] = _device(rest, raw) if raw else None
        elif kind == "x:":
            dead[rest] = raw == "1"
        elif kind == "e:":
            environments[rest] = as_environment(raw)
    return DeviceChanges(epoch, False, devices, dead, environments)
