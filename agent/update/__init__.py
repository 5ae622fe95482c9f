"""The device's update subsystem: follow the fleet's signed desired variant, safely.

- ``updater``: the state machine — download → verify → pre-flight → activate →
  soak → healthy, or refused / failed / rolled back;
- ``service``: that machine inside ``quantfleet-agent serve`` (its MQTT session
  for desired and device state, and the serving hooks: pre-flight on a golden
  subset, hot swap, soak watch);
- ``download``: resumable, bandwidth-limited, verified artifact fetches;
- ``soak``: the device's own watch on the variant it just activated;
- ``signing``: ed25519 signatures over what a variant is (the fleet signs too).

Its options are ``[update]`` in agent/config.py; docs/updates.md tells the walk.
Nothing is imported here, so ``quantfleet.agent.update.signing`` (which the
fleet uses) costs no MQTT client or backend.
"""
