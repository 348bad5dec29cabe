"""A stand-in for orpo_ds.engine.Engine, to drive the training loop's step without DeepSpeed."""

from __future__ import annotations


class PlainEngine:
    """The engine facade's surface over a plain module: forward, backward, and a step that always applies."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        loss.backward()

    def step(self) -> bool:
        return True
