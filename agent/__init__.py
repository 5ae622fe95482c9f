"""The on-device agent: inference backends, the local API, telemetry and updates."""
