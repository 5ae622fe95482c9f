"""fleet/broker.py without a broker: no two enrollable devices share a username or a
client id (the binding that stops a device taking another's session rests on it),
and a device's role names only its own topics."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantfleet.agent.wire import DEVICE_ID_PATTERN
from quantfleet.fleet.broker import (
    check_device_id,
    device_role,
    device_users,
    enroll_commands,
    fleet_role,
    initial_config,
)

ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)


def _enrollable(device_id: str) -> bool:
    try:
        check_device_id(device_id)
    except ValueError:
        return False
    return True


@given(ids, ids)
def test_two_devices_never_share_a_username_or_a_client_id(a: str, b: str) -> None:
    if a == b or not (_enrollable(a) and _enrollable(b)):
        return
    users_a, users_b = device_users(a), device_users(b)
    assert not {u for u, _ in users_a} & {u for u, _ in users_b}
    assert not {c for _, c in users_a} & {c for _, c in users_b}


def test_the_collisions_the_rules_prevent() -> None:
    # x's update channel is qf-x-update, which would be device x-update's client id.
    assert device_users("x")[1][1] == device_users("x-update")[0][1]
    with pytest.raises(ValueError, match="may not end in -update"):
        check_device_id("x-update")
    # ':' is not in a device id, so "x:update" is only ever x's update user.
    assert not re.fullmatch(DEVICE_ID_PATTERN, "x:update")
    with pytest.raises(ValueError, match="not a device id"):
        enroll_commands("a/b", "pw")


@given(ids)
def test_a_device_role_names_only_its_own_topics(device_id: str) -> None:
    role = device_role(device_id, "root/v1")
    assert role["acls"]
    for acl in role["acls"]:
        assert acl["topic"].startswith(f"root/v1/devices/{device_id}/")
        assert "+" not in acl["topic"] and "#" not in acl["topic"] and acl["allow"]
        assert acl["acltype"] != "subscribePattern"  # literal subscriptions only


def test_everything_no_role_allows_is_denied() -> None:
    cfg = initial_config("fleet-secret-1", "admin-secret-2")
    assert cfg["defaultACLAccess"] == {"publishClientSend": False,
                                       "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": True}
    assert [c["username"] for c in cfg["clients"]] == ["quantfleet-admin", "fleet"]
    assert "secret" not in str(cfg)  # hashes only
    assert all(len(c["salt"]) == 16 and c["iterations"] == 101 for c in cfg["clients"])
    fleet = {(a["acltype"], a["topic"]) for a in fleet_role()["acls"]}
    assert ("publishClientSend", "quantfleet/v1/devices/+/desired") in fleet
    assert not any(t == "publishClientSend" and not topic.endswith("/desired")
                   for t, topic in fleet)
