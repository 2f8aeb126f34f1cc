"""How long a sweep's experiment has been held, by instance type and zone: its cost's record.

A sweep's instances take experiments in turn, and EC2 keeps no record of which instance held
which experiment's volume when. So each holder keeps it on the experiment's volume, in the
``spotrun:held`` tag: the seconds every holder so far spent on it, summed by ``type@zone`` (the
price's key), e.g. ``p3.2xlarge@us-east-1a=1234 g4dn.xlarge@us-east-1b=56``. The agent adds
its own time (from its claim) to what earlier holders left there, written with the tags it
writes anyway (no call of its own); `spotrun status` prices it. An instance killed without a
drain loses at most the time since its last tag write (``agent.progress_tag_interval_s``).
The tag travels with the volume through a migration (its tags are copied).
"""
from __future__ import annotations

import math
import re

TAG_VALUE_MAX = 256  # EC2's limit on a tag value
_ENTRY = re.compile(r"^([A-Za-z0-9.\-]+@[a-z0-9\-]+)=(\d+)$")


def parse(text: str | None) -> dict[str, int]:
    """``type@zone -> seconds`` from a tag value; entries that do not parse are left out (the
    tag is a report, written by the agent; a hand-edited one costs only its bad entries)."""
    held: dict[str, int] = {}
    for entry in (text or "").split():
        match = _ENTRY.match(entry)
        if match:
            held[match.group(1)] = held.get(match.group(1), 0) + int(match.group(2))
    return held


def key(instance_type: str, zone: str) -> str:
    return f"{instance_type}@{zone}"


def add(held: dict[str, int], where: str, seconds: float) -> dict[str, int]:
    """``held`` with ``seconds`` more at ``where`` (a new dict)."""
    out = dict(held)
    out[where] = out.get(where, 0) + max(0, int(seconds))
    return out


def format_tag(held: dict[str, int]) -> str:
    """The tag value, longest-held first; entries that would pass EC2's 256 characters are
    left out (the shortest-held ones: the cost shown is then a lower bound)."""
    parts: list[str] = []
    for where, seconds in sorted(held.items(), key=lambda item: (-item[1], item[0])):
        entry = f"{where}={seconds}"
        if len(" ".join(parts + [entry])) <= TAG_VALUE_MAX:
            parts.append(entry)
    return " ".join(parts)


def cost(held: dict[str, int], spot_prices: dict[tuple[str, str], float]) -> tuple[float, list[str]]:
    """(US dollars at today's spot prices, the ``type@zone`` entries without a price)."""
    total, unpriced = 0.0, []
    for where, seconds in sorted(held.items()):
        instance_type, _, zone = where.partition("@")
        price = spot_prices.get((instance_type, zone))
        if price is None or not math.isfinite(price):
            unpriced.append(where)
            continue
        total += seconds / 3600.0 * price
    return total, unpriced
