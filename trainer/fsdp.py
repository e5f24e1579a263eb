"""FSDP for `lorad train` under torchrun: placeholder filled in below."""

from __future__ import annotations


def fsdp_arguments(cfg, device_type: str, world_size: int) -> dict:
    if not cfg.fsdp:
        return {}
    raise NotImplementedError
