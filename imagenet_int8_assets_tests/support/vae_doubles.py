"""Test doubles around a real LoadedVae (no heavy imports: spawned crop workers import test modules)."""


class WrappedVae:
    """Base of test doubles that wrap a real LoadedVae: ``info`` and ``dtype`` are the wrapped
    model's; subclasses change ``cast`` and ``encode``."""

    def __init__(self, vae):
        self.vae = vae

    @property
    def info(self):
        return self.vae.info

    @property
    def dtype(self):
        return self.vae.dtype
