"""``python -m quantfleet.agent.telemetry`` is ``quantfleet-agent telemetry``."""

import logging
import os

from quantfleet.agent.telemetry.cli import telemetry_group

logging.basicConfig(level=os.environ.get("QUANTFLEET_LOG", "WARNING"),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
telemetry_group(prog_name="python -m quantfleet.agent.telemetry")
