"""The JSON Schemas of the wire payloads, rendered exactly as docs/schemas/ holds them."""

from __future__ import annotations

import json

from quantfleet.agent.wire import json_schemas


def render_schemas() -> dict[str, str]:
    """File name to text, stable (sorted keys) so drift is a plain text difference."""
    return {f"{name}.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
            for name, schema in json_schemas().items()}
