"""A safetensors file's tensors read only when taken: a process that keeps only its shard of each (FSDP2,
DeepSpeed ZeRO) never holds the whole checkpoint (`sdcli.training.checkpoints.read_tree`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Deferred:
    """One tensor of a safetensors file, read by `take`."""

    __slots__ = ("_file", "_key")

    def __init__(self, file: Any, key: str):
        self._file, self._key = file, key

    def take(self) -> Any:
        return self._file.get_tensor(self._key)


class LazyTensors(Mapping):
    """A safetensors file's tensors by name, each read when asked for; ``deferred``: as `Deferred`s."""

    def __init__(self, file: str, deferred: bool = True):
        from safetensors import safe_open

        self._file, self._deferred = safe_open(file, framework="pt"), deferred

    def __getitem__(self, key: str) -> Any:
        if key not in self._file.keys():
            raise KeyError(key)
        return Deferred(self._file, key) if self._deferred else self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._file.keys())

    def __len__(self) -> int:
        return len(self._file.keys())


def taken(tree: Any) -> Any:
    """``tree`` with every `Deferred` read."""
    if isinstance(tree, Deferred):
        return tree.take()
    if isinstance(tree, dict):
        return {k: taken(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(taken(v) for v in tree)
    return tree
