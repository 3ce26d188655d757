"""The decode processes' shared memory: how many image slots each process's arena gets, fitted
to the free space of /dev/shm. tmpfs accepts a segment larger than its free space and then
kills the process that writes past it with SIGBUS, so the plane plans first (`plan_arenas`):
fewer slots and a warning, or an error naming the fix when not even MIN_SLOTS fit (Docker
gives a container 64 MB unless told `--shm-size`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Settings

MIN_SLOTS = 2
"""Jobs per process at least: one downloading while another decodes."""
SHM_DIR = "/dev/shm"
"""Where Linux keeps shared memory (a tmpfs); its free space bounds the arenas."""
SHM_SHARE = 0.5
"""Most of /dev/shm's free space the arenas may take: the rest for the server's other processes
(WORKERS > 1: each has its own plane) and libraries."""
SHM_FIX = ("give the container more shared memory (Docker: --shm-size=1g; Compose: shm_size: "
           "1gb), or lower DECODE_PROCESSES or FETCH_CONCURRENCY")


@dataclass(frozen=True)
class ArenaPlan:
    """The shared memory the decode processes need: `processes` arenas of `slots` images of
    side x side x 3 bytes each, `wanted` slots being what the settings ask for."""

    processes: int
    side: int
    wanted: int
    slots: int
    free_bytes: int | None
    """Free space in /dev/shm when planned; None where there is none (not Linux) or unknown."""

    @property
    def slot_bytes(self) -> int:
        return self.side * self.side * 3

    @property
    def arena_bytes(self) -> int:
        """One process's arena."""
        return self.slots * self.slot_bytes

    @property
    def bytes(self) -> int:
        """All the arenas."""
        return self.processes * self.arena_bytes

    @property
    def wanted_bytes(self) -> int:
        return self.processes * self.wanted * self.slot_bytes

    @property
    def fits(self) -> bool:
        return self.slots >= MIN_SLOTS

    @property
    def reduced(self) -> bool:
        return self.slots < self.wanted

    def describe(self) -> str:
        """E.g. '2 processes x 16 slots of 224x224 px = 4.6 MiB, of 64.0 MiB free in /dev/shm'."""
        free = ("" if self.free_bytes is None
                else f", of {_mib(self.free_bytes)} free in {SHM_DIR}")
        return (f"{self.processes} processes x {self.slots} slots of {self.side}x{self.side} px "
                f"= {_mib(self.bytes)}{free}")

    def shortage(self) -> str:
        """Why the settings' arenas do not fit, for a warning or an error."""
        return (f"the decode processes' shared memory ({self.processes} processes x "
                f"{self.wanted} slots (FETCH_CONCURRENCY) x {self.side}x{self.side}x3 bytes = "
                f"{_mib(self.wanted_bytes)}) does not fit in {SHM_SHARE:.0%} of the "
                f"{_mib(self.free_bytes or 0)} free in {SHM_DIR}")


def plan_arenas(settings: Settings, processes: int, side: int,
                free_bytes: int | None) -> ArenaPlan:
    """FETCH_CONCURRENCY slots per process (at least MIN_SLOTS), fewer if that many do not fit
    in SHM_SHARE of `free_bytes` (then `fits` says whether even MIN_SLOTS do)."""
    wanted = max(MIN_SLOTS, settings.FETCH_CONCURRENCY)
    slots = wanted
    if free_bytes is not None:
        slots = min(wanted, int(free_bytes * SHM_SHARE) // (processes * side * side * 3))
    return ArenaPlan(processes, side, wanted, slots, free_bytes)


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes in the shared-memory filesystem, or None where it does not exist."""
    try:
        stat = os.statvfs(path)
    except (OSError, AttributeError):  # no /dev/shm (macOS), no statvfs (Windows)
        return None
    return stat.f_bavail * stat.f_frsize


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
