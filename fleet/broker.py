"""The broker's access control: Mosquitto's dynamic security plugin, as quantfleet uses it.

One owner for who may do what on the broker (packaging/mosquitto/quantfleet.conf
loads the plugin). Mosquitto 2.0's ``acl_file`` checks read access only when it
delivers a message, so a device could join the fleet's shared telemetry
subscription (and the broker dropped what it routed to the device), and it binds no
client id to a username. The plugin checks subscriptions at SUBSCRIBE time (denied
unless a role allows them) and refuses a CONNECT whose client id is not the one
bound to its username, before an existing session with that id is touched.

Who is on the broker:

- the **admin** (``quantfleet-admin``): only the plugin's control topic, used by
  ``quantfleet devices enroll``;
- the **fleet** (``fleet``): reads every device's telemetry (also on a shared
  subscription), status and state, reads and writes desired state; not bound to a
  client id, because fleet replicas share the user and each connects several
  clients (``quantfleet-fleet``, ``…-pub-<random>``, the CLI's);
- per **device** ``D``, two users, one per connection of the agent, each bound to
  that connection's client id: ``D`` as ``qf-D`` (telemetry and status) and
  ``D:update`` as ``qf-D-update`` (the update channel), with one password and one
  role that names only D's topics. ``:`` is not allowed in a device id, so no
  device's user is another's update user.

``initial_config`` is the plugin's JSON file, written before the broker first
starts (``quantfleet broker init``); afterwards the plugin owns the file and
rewrites it, so devices are added through its control topic (``DynsecControl``)
while the broker runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import uuid
from typing import Any

from quantfleet.agent.mqtt import MqttConfig, connect_options, make_client
from quantfleet.agent.wire import DEVICE_ID_PATTERN, TOPIC_ROOT

ADMIN_USER = "quantfleet-admin"
FLEET_USER = "fleet"
UPDATE_SUFFIX = ":update"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
# What mosquitto_passwd and the plugin use; the plugin reads the count from the file.
PBKDF2_ITERATIONS = 101


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> dict[str, Any]:
    """The plugin's stored form of a password: PBKDF2-SHA512, 12-byte salt, base64."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return {"password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": iterations}


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def admin_role() -> dict[str, Any]:
    return {"rolename": "quantfleet-admin", "textname": "manages the dynamic security plugin",
            "acls": [_acl(t, "$CONTROL/dynamic-security/#")
                     for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]}


def fleet_role(root: str = TOPIC_ROOT) -> dict[str, Any]:
    devices = f"{root}/devices/+"
    acls = [
        # The shared subscription is checked as written, $share/<group>/ and all.
        _acl("subscribePattern", f"$share/+/{devices}/telemetry"),
        _acl("subscribePattern", f"{devices}/telemetry"),  # an empty share_group
        _acl("subscribePattern", f"{devices}/status"),
        _acl("subscribePattern", f"{devices}/state"),
        _acl("subscribePattern", f"{devices}/desired"),
        _acl("publishClientSend", f"{devices}/desired"),
    ]
    acls += [_acl("publishClientReceive", f"{devices}/{leaf}")
             for leaf in ("telemetry", "status", "state", "desired")]
    return {"rolename": "quantfleet-fleet", "textname": "the fleet service", "acls": acls}


def device_role_name(device_id: str) -> str:
    return f"quantfleet-device-{device_id}"


def device_role(device_id: str, root: str = TOPIC_ROOT) -> dict[str, Any]:
    """Only D's own topics: publish status, telemetry and state; read its own status
    (the agent re-announces itself when a stale Will replaced its birth) and desired."""
    own = f"{root}/devices/{device_id}"
    acls = [_acl("publishClientSend", f"{own}/{leaf}") for leaf in ("status", "telemetry", "state")]
    for leaf in ("status", "desired"):
        acls += [_acl("subscribeLiteral", f"{own}/{leaf}"),
                 _acl("publishClientReceive", f"{own}/{leaf}")]
    return {"rolename": device_role_name(device_id), "textname": f"device {device_id}",
            "acls": acls}


def device_users(device_id: str, client_id: str | None = None) -> list[tuple[str, str]]:
    """``[(username, client_id)]`` of a device's two connections, as the agent makes them
    (agent/telemetry/publisher.py: ``mqtt.client_id`` or ``qf-<device>``; the update
    channel adds ``-update``)."""
    base = client_id or f"qf-{device_id}"
    return [(device_id, base), (device_id + UPDATE_SUFFIX, f"{base}-update")]


def check_device_id(device_id: str, reserved: tuple[str | None, ...] = ()) -> None:
    """ValueError unless ``device_id`` can be enrolled: a device id whose users and
    client ids are no other device's, and not the admin's or the fleet's name."""
    if device_id in {ADMIN_USER, FLEET_USER, *reserved}:
        raise ValueError(f"{device_id!r} is the broker's admin or fleet user, not a device")
    if not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise ValueError(f"{device_id!r} is not a device id (letters, digits, . _ -; "
                         "at most 64, starting with a letter or digit)")
    if device_id.endswith("-update"):
        # Its telemetry client id qf-X-update would be device X's update channel's.
        raise ValueError(f"{device_id!r}: a device id may not end in -update (its client id "
                         f"would be the update channel's of device {device_id[:-7]!r})")


def initial_config(fleet_password: str, admin_password: str, *, root: str = TOPIC_ROOT,
                   fleet_user: str = FLEET_USER, admin_user: str = ADMIN_USER
                   ) -> dict[str, Any]:
    """The plugin's JSON file with the admin and the fleet, and no device yet.

    Everything not allowed by a role is denied, receiving included (the plugin's own
    default lets every client receive what it subscribed to).
    """
    return {
        "clients": [
            {"username": admin_user, "textname": "quantfleet devices enroll",
             **hash_password(admin_password), "roles": [{"rolename": "quantfleet-admin"}]},
            {"username": fleet_user, "textname": "the fleet service",
             **hash_password(fleet_password), "roles": [{"rolename": "quantfleet-fleet"}]},
        ],
        "groups": [],
        "roles": [admin_role(), fleet_role(root)],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
    }


def enroll_commands(device_id: str, password: str, *, root: str = TOPIC_ROOT,
                    client_id: str | None = None, reserved: tuple[str | None, ...] = ()
                    ) -> list[dict[str, Any]]:
    """Control-topic commands that create a device's role and its two bound users.

    The plugin runs each command on its own: the names are checked here first so
    that none of them fails half-way (a second enrolment fails at all three)."""
    check_device_id(device_id, reserved)
    role = device_role(device_id, root)
    commands: list[dict[str, Any]] = [{"command": "createRole", **role}]
    for username, cid in device_users(device_id, client_id):
        commands.append({"command": "createClient", "username": username, "password": password,
                         "clientid": cid, "textname": f"device {device_id}",
                         "roles": [{"rolename": role["rolename"]}]})
    return commands


def rotate_commands(device_id: str, password: str, *, client_id: str | None = None
                    ) -> list[dict[str, Any]]:
    """A new password for both of a device's users (the plugin disconnects their
    sessions, which come back only with the new one)."""
    check_device_id(device_id)
    return [{"command": "setClientPassword", "username": u, "password": password}
            for u, _ in device_users(device_id, client_id)]


def revoke_commands(device_id: str) -> list[dict[str, Any]]:
    """Delete a device's users (the plugin disconnects them) and its role."""
    check_device_id(device_id)
    return [*({"command": "deleteClient", "username": u} for u, _ in device_users(device_id)),
            {"command": "deleteRole", "rolename": device_role_name(device_id)}]


class DynsecError(RuntimeError):
    """The broker refused a control command, or did not answer."""


class DynsecControl:
    """Commands to the plugin over its control topic (what ``mosquitto_ctrl dynsec``
    sends), on one connection with the admin's credentials."""

    def __init__(self, cfg: MqttConfig, timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` in one request; their responses, in order. Raises
        DynsecError naming the first command the plugin refused."""
        # Every admin reads the same response topic: ours are the ones carrying our tag.
        tag = uuid.uuid4().hex
        tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        ready, answered = threading.Event(), threading.Event()
        refusal: list[str] = []
        response: list[dict[str, Any]] = []
        client = make_client(self.cfg, f"quantfleet-enroll-{tag[:8]}")

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            if rc.is_failure:
                refusal.append(f"the broker refused the admin's connection: {rc}")
                ready.set()
                return
            c.subscribe(f"{CONTROL_TOPIC}/response", qos=1)

        def on_subscribe(c: Any, u: Any, mid: int, reasons: Any, props: Any) -> None:
            failed = [r for r in reasons if getattr(r, "is_failure", False)]
            if failed:
                refusal.append(f"the control topic's response was refused: {failed}")
            ready.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            try:
                doc = json.loads(msg.payload)
                ours = [r for r in doc.get("responses", [])
                        if str(r.get("correlationData", "")).startswith(tag)]
            except (ValueError, AttributeError):
                return
            if ours:
                response.extend(ours)
                answered.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        try:
            client.connect(*self.cfg.address(), **connect_options(self.cfg))
        except OSError as exc:
            raise DynsecError(f"broker {self.cfg.broker}: {exc}") from None
        client.loop_start()
        try:
            if not ready.wait(self.timeout_s):
                raise DynsecError(f"broker {self.cfg.broker}: no answer to the admin's connection")
            if refusal:
                raise DynsecError(refusal[0])
            client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            if not answered.wait(self.timeout_s):
                raise DynsecError("the dynamic security plugin did not answer (is it loaded?)")
        finally:
            client.disconnect()
            client.loop_stop()
        for r in response:
            if r.get("error"):
                raise DynsecError(f"{r.get('command')}: {r['error']}")
        return response
