"""Backends run a padded batch of token ids through one model file. They never see text or HTTP."""

from service.backends.base import Backend, BackendInfo, load_backend

__all__ = ["Backend", "BackendInfo", "load_backend"]
