"""Rewards: the interface, registry, built-ins and the shapes world (docs/rewards.md)."""

from rl.library_notices import hide_library_notices

hide_library_notices()
