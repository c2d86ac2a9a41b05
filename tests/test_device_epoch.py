"""The store is the one truth for devices: every change moves its device epoch in the change's own write, a
copy follows it through OverlaySync, and API-key scopes are decided by the store against what it holds.

Run against both stores (the fixtures of ``tests/test_store.py``): two store objects on one backend play two
processes (or two instances) that each keep a copy.
"""

from __future__ import annotations

import asyncio
import uuid

from relay.config import load_config
from relay.registry.device import Device
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.registry.scope import Refusal, Removal, Scope
from relay.registry.sync import OverlaySync
from relay.store import Store
from relay.testing.sandbox import Sandbox
from tests import test_store as shared
from tests.test_store import NOW, MakeStore

settings, make_store, store = shared.settings, shared.make_store, shared.store  # both backends' fixtures

APPS = frozenset({"ios", "android"})
MANAGE = Scope(True, frozenset({"ios"}), APPS)
REGISTER = Scope(False, frozenset({"ios"}), APPS)


def _hex() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def _copy(sandbox: Sandbox, store: Store) -> tuple[Registry, OverlaySync]:
    config = load_config(sandbox.write())
    registry = Registry(config.apps, load_registry(config.registry, config.apps))
    return registry, OverlaySync(store, registry)


async def test_every_device_change_moves_the_epoch_and_no_op_writes_do_not(store: Store) -> None:
    """put, remove, dead mark, its clearing and a learned environment each bump the epoch; repeats do not."""
    token, other = _hex(), _hex()
    epochs = [await store.device_epoch()]

    async def moved() -> bool:
        epochs.append(await store.device_epoch())
        return epochs[-1] > epochs[-2]

    await store.put_device(Device(token, "ios", token), NOW)
    assert await moved()
    assert await store.mark_dead(token, "Unregistered", NOW)
    assert await moved()
    assert not await store.mark_dead(token, "Unregistered", NOW)
    assert not await moved()
    await store.put_device(Device(token, "ios", other), NOW)  # clears the dead mark
    assert await moved()
    await store.remember_environment(other, "sandbox", NOW)
    assert await moved()
    await store.remember_environment(other, "sandbox", NOW)
    assert not await moved()
    assert await store.remove_device(token) is Removal.REMOVED
    assert await moved()
    assert await store.remove_device(token) is Removal.ABSENT
    assert not await moved()


async def test_a_copy_follows_changes_made_through_another_store_object(make_store: MakeStore,
                                                                         sandbox: Sandbox) -> None:
    """Another process's re-point, removal, dead mark, revival and learned environment reach this copy at its
    next refresh, and a refresh with nothing changed applies nothing."""
    writer, reader = await make_store(), await make_store()
    registry, sync = _copy(sandbox, reader)
    token, first, second = _hex(), _hex(), _hex()
    await writer.put_device(Device(token, "ios", first), NOW)
    await sync.load()
    assert registry.lookup(token) is not None and registry.lookup(token).device_token == first  # type: ignore[union-attr]
    assert not await sync.refresh()

    await writer.put_device(Device(token, "ios", second), NOW)
    await writer.remember_environment(second, "sandbox", NOW)
    assert await sync.refresh()
    route = registry.lookup(token)
    assert route is not None and (route.device_token, route.environment) == (second, "sandbox")

    await writer.mark_dead(token, "Unregistered", NOW)
    assert await sync.refresh() and registry.is_dead(token)
    await writer.put_device(Device(token, "ios", first), NOW)
    assert await sync.refresh() and not registry.is_dead(token)
    assert registry.lookup(token).device_token == first  # type: ignore[union-attr]

    await writer.remove_device(token)
    assert await sync.refresh()
    assert registry.lookup(token) is None and not registry.is_runtime(token)


async def test_a_reader_ahead_of_the_store_reads_everything_again(store: Store) -> None:
    """A copy whose epoch the store does not know (a store restored from a backup) is replaced whole."""
    token = _hex()
    await store.put_device(Device(token, "ios", token), NOW)
    changes = await store.device_changes(10**9)
    assert changes.full and token in changes.devices
    delta = await store.device_changes(changes.epoch - 1)
    assert not delta.full and list(delta.devices) == [token]


async def test_a_register_key_can_never_take_over_a_manage_mapping_in_the_store(make_store: MakeStore) -> None:
    """Decided by the store against what it holds: a register key's write over a mapped entry, another app's
    entry or an environment change is refused and changes nothing; its own token it may (re-)register."""
    backend, app_side = await make_store(), await make_store()
    mapped, own = _hex(), _hex()
    assert (await backend.put_device(Device(mapped, "ios", _hex()), NOW, MANAGE)).device is not None
    before = await backend.device_epoch()

    refused = await app_side.put_device(Device(mapped, "ios", mapped), NOW, REGISTER)
    assert (refused.device, refused.refusal) == (None, Refusal.TAKEN)
    assert (await app_side.put_device(Device(own, "ios", _hex()), NOW, REGISTER)).refusal is Refusal.NOT_ITSELF
    other_app = await app_side.put_device(Device(mapped, "ios", mapped), NOW,
                                          Scope(True, frozenset({"android"}), APPS))
    assert other_app.refusal is Refusal.OTHER_APP
    assert await backend.device_epoch() == before  # nothing was written

    first = await app_side.put_device(Device(own, "ios", own, "sandbox"), NOW, REGISTER)
    assert first.device == Device(own, "ios", own, "sandbox") and first.replaced is None
    again = await app_side.put_device(Device(own, "ios", own), NOW, REGISTER)
    assert again.device == Device(own, "ios", own, "sandbox")  # omitted: the environment stays
    changed = await app_side.put_device(Device(own, "ios", own, "production"), NOW, REGISTER)
    assert changed.refusal is Refusal.ENVIRONMENT
    assert await app_side.remove_device(own, REGISTER) is Removal.SCOPE
    assert await app_side.remove_device(own, Scope(True, frozenset({"android"}), APPS)) is Removal.OTHER_APP
    assert await app_side.remove_device(own, MANAGE) is Removal.REMOVED


async def test_racing_register_and_manage_writes_never_leave_the_register_keys_entry(make_store: MakeStore) -> None:
    """Two processes race a manage key's mapping and a register key's self-registration of one token, many
    times: whichever runs first, the mapping is what stays (the register write is refused or overwritten)."""
    backend, app_side = await make_store(), await make_store()
    for _ in range(40):
        token, device_token = _hex(), _hex()
        manage, register = await asyncio.gather(
            backend.put_device(Device(token, "ios", device_token), NOW, MANAGE),
            app_side.put_device(Device(token, "ios", token), NOW, REGISTER),
        )
        assert manage.device is not None
        assert register.device is None or manage.replaced == register.device
        assert await backend.get_device(token) == Device(token, "ios", device_token)


async def test_concurrent_refreshes_share_reads_yet_each_sees_what_changed_before_it_began(
        make_store: MakeStore, sandbox: Sandbox) -> None:
    """Fifty refreshes at once cost at most two epoch reads; a refresh that begins while an older read is in
    flight (and after a change) is not answered from that older read."""
    writer, reader = await make_store(), await make_store()
    registry, sync = _copy(sandbox, reader)
    await sync.load()
    real, reads, gate = reader.device_epoch, [0], asyncio.Event()

    async def counted() -> int:
        reads[0] += 1
        value = await real()
        if reads[0] == 1:
            await gate.wait()  # the first read has its (old) answer but has not returned it yet
        return value

    reader.device_epoch = counted  # type: ignore[method-assign]
    gate.set()
    await asyncio.gather(*(sync.refresh() for _ in range(50)))
    assert reads[0] <= 2

    reads[0], token = 0, _hex()
    gate.clear()
    first = asyncio.create_task(sync.refresh())
    while reads[0] == 0:
        await asyncio.sleep(0)
    await writer.put_device(Device(token, "ios", token), NOW)
    second = asyncio.create_task(sync.refresh())
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, second)
    assert registry.is_runtime(token)
