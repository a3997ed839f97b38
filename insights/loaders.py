"""Loaders for models an operator names by file: TorchScript modules, ``torch.export`` programs
and state dicts. Each returns a function that loads the model when it is first used; only paths
the operator wrote are read (never anything a browser sent)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def torchscript_loader(path: str) -> Callable[[], nn.Module]:
    """A loader for a TorchScript file chosen by the operator (no pickle involved)."""
    def load() -> nn.Module:
        return torch.jit.load(path, map_location="cpu")
    load.format = "torchscript"  # read by register(): its modules take no forward hooks
    return load


class ExportedClassifier(nn.Module):
    """A ``torch.export`` program as a classifier the engine can run. Its layers are one flat
    graph (no hooks to put on them, ``takes_hooks = False``), it cannot switch to training mode
    (it was exported in the mode it runs in), and a program exported for a fixed batch size runs
    a batch of another size one row at a time."""

    takes_hooks = False

    def __init__(self, program):
        super().__init__()
        self.program = program.module()
        first = next(n for n in program.graph.nodes if n.op == "placeholder"
                     and n.name in program.graph_signature.user_inputs)
        shape = first.meta["val"].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None  # a SymInt: dynamic
        self.row_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])  # None: dynamic

    def train(self, mode: bool = True) -> "ExportedClassifier":
        self.training = False  # the program's own mode is fixed; only the wrapper's flag moves
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(want is not None and want != got for want, got in zip(self.row_shape, x.shape[1:])):
            shown = "×".join(str(d) if d is not None else "any" for d in self.row_shape)
            raise ValueError(f"the exported program takes {shown} inputs, not {'×'.join(map(str, x.shape[1:]))}; "
                             "register it in a models config with exported_loader and a Preprocessing whose "
                             "crop matches")
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return self.program(x)
        if self.fixed_batch != 1:
            raise ValueError(f"the exported program takes batches of exactly {self.fixed_batch}; export it "
                             "with a dynamic batch (dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")
        return torch.cat([self.program(row) for row in x.split(1)])


def exported_loader(path: str) -> Callable[[], nn.Module]:
    """A loader for a program saved with ``torch.export.save`` (an operator's file)."""
    def load() -> nn.Module:
        return ExportedClassifier(torch.export.load(path))
    load.format = "exported"  # read by register()
    return load


def state_dict_loader(build: Callable[[], nn.Module], path: str) -> Callable[[], nn.Module]:
    """A loader that builds an architecture and loads a state dict with ``weights_only=True``."""
    def load() -> nn.Module:
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    return load
