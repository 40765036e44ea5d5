"""Library notices that say nothing about a run, filtered before the libraries load (``rl`` and ``rewards`` import
this first), so a run's first line and a user error's one line are what a user reads first."""

from __future__ import annotations

import logging


def _not_the_torchvision_fallback(record: logging.LogRecord) -> bool:
    # transformers >= 5 without torchvision: diffusers' FLUX pipeline imports CLIP's and SigLIP's image processors
    # (IP-Adapter inputs, never used here), and transformers announces its PIL fallback for each at import
    return "requires torchvision (not installed)" not in record.getMessage()


def hide_library_notices() -> None:
    """Filter the notices above out of their library's logger (idempotent)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if _not_the_torchvision_fallback not in logger.filters:
        logger.addFilter(_not_the_torchvision_fallback)
