"""Host health from psutil: CPU, memory, load, disk, temperatures, the agent's own RSS."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil

from quantfleet.agent.wire import HealthPayload

log = logging.getLogger(__name__)


class HealthSampler:
    """Samples host health; CPU figures cover the time since the previous sample."""

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = Path(disk_path)
        self._proc = psutil.Process(os.getpid())
        # The first cpu_percent() call only sets the baseline.
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)

    def sample(self) -> HealthPayload:
        mem = psutil.virtual_memory()
        try:
            load = os.getloadavg()
        except OSError:  # not on every platform
            load = (0.0, 0.0, 0.0)
        path = self.disk_path if self.disk_path.exists() else self.disk_path.parent
        disk = psutil.disk_usage(str(path))
        return HealthPayload(
            cpu_percent=psutil.cpu_percent(None), load_1m=load[0], load_5m=load[1],
            load_15m=load[2], memory_total_bytes=mem.total, memory_available_bytes=mem.available,
            disk_path=str(path), disk_total_bytes=disk.total, disk_free_bytes=disk.free,
            temperatures_c=self._temperatures(), agent_rss_bytes=self._proc.memory_info().rss,
            agent_cpu_percent=self._proc.cpu_percent(None),
        )

    @staticmethod
    def _temperatures() -> dict[str, float]:
        reader = getattr(psutil, "sensors_temperatures", None)
        if reader is None:
            return {}
        try:
            sensors = reader()
        except (OSError, RuntimeError) as exc:  # some kernels expose broken sensors
            log.debug("no temperatures: %s", exc)
            return {}
        out: dict[str, float] = {}
        for chip, readings in sensors.items():
            for i, r in enumerate(readings):
                if r.current is not None:
                    out[f"{chip}/{r.label or i}"] = float(r.current)
        return out
