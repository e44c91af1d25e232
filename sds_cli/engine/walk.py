"""Visiting the decoder blocks in order, and finding the linears a stage selects inside them."""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Protocol

from torch import nn

from sds_cli.engine.stats import Frozen, collect, input_groups
from sds_cli.engine.stream import Stream, sync
from sds_cli.models import block_linears, decoder_layers


class BlockStore(Protocol):
    """Where finished blocks are kept so that a killed run resumes (``results.checkpoint.StageCheckpoint``)."""

    def finished(self) -> int: ...
    def restore(self, i: int, linears: dict[str, nn.Linear]) -> list[dict]: ...
    def save(self, i: int, linears: dict[str, nn.Linear], rows: list[dict]) -> None: ...


class BlockStage:
    """What a stage does at each block. ``walk`` moves block ``i`` to the device and calls ``step`` on its
    ``targets`` linears, then ``advance`` to compute the stream entering the next block. A block restored
    from a checkpoint is handed to ``restored`` instead of ``step``, so side streams keep in step."""

    targets: str  # regex over the linear names inside a block

    def step(self, i: int, block: nn.Module, stream: Stream, linears: dict[str, nn.Linear]) -> list: ...

    def restored(self, i: int, block: nn.Module) -> None:
        pass

    def advance(self, stream: Stream, block: nn.Module) -> Stream:
        return stream.through(block)


PROFILE = ("collect", "prune", "advance")  # seconds: inputs and their second moments, pruner math, next block's inputs


class GroupStage(BlockStage):
    """A stage that changes a block's linears input group by input group (q/k/v, o, gate/up, down). With
    ``sequential``, each group's statistics come from its inputs once the groups before it are final, and finished
    submodules replay their outputs (``Frozen``; on the CPU finished linears too), so the block's forward runs
    about once; otherwise every statistic comes from the block as it entered the stage."""

    sequential: bool
    frozen: Frozen | None = None

    def __post_init__(self):
        self.profile = dict.fromkeys(PROFILE, 0.0)

    def step(self, i, block, stream, linears):
        names = list(linears)
        if self.sequential:
            self.frozen = Frozen(block, names, stream, linears=stream.device.type == "cpu")
        records = []
        for group in input_groups(block, stream, names) if self.sequential else [names]:
            with self.timed("collect", stream):
                stats = self.statistics(block, stream, group)
            with self.timed("prune", stream):
                records += [self.layer(i, name, linears[name], stats[name]) for name in group]
            if self.frozen:
                self.frozen.freeze({r.layer for r in records})
        return records

    @contextmanager
    def timed(self, part: str, stream: Stream):
        start = time.perf_counter()
        yield
        sync(stream.device)
        self.profile[part] += time.perf_counter() - start

    def statistics(self, block: nn.Module, stream: Stream, names: list[str]) -> dict:
        return collect(block, stream, names, shared=self.sequential)

    def layer(self, i: int, name: str, linear: nn.Linear, stats) -> object:
        """Change one linear; return its record (a dataclass with a ``layer`` field)."""
        raise NotImplementedError

    def advance(self, stream, block):
        try:
            with self.timed("advance", stream):
                return stream.through(block)
        finally:
            self.release()

    def run(self, model: nn.Module, stream: Stream, checkpoint: BlockStore | None = None,
            progress: Callable[[int], None] = lambda i: None, profile: dict | None = None) -> list[dict]:
        """``walk`` with this stage; however it ends, every replay is released and ``profile`` gets the seconds."""
        try:
            return walk(model, stream, self, checkpoint, progress)
        finally:
            self.release()
            if profile is not None:
                profile.update(self.profile)

    def release(self) -> None:
        """Every replayed submodule gets its own forward back."""
        if self.frozen:
            self.frozen.restore()
            self.frozen = None


def walk(model: nn.Module, stream: Stream, stage: BlockStage, checkpoint: BlockStore | None = None,
         progress: Callable[[int], None] = lambda i: None) -> list[dict]:
    """Visit the blocks in order and let ``stage`` change each; returns every record (as dicts)."""
    blocks = decoder_layers(model)
    done = checkpoint.finished() if checkpoint else 0
    records: list[dict] = []
    for i, block in enumerate(blocks):
        block.to(stream.device)
        linears = selected_linears(block, stage.targets)
        if i < done:
            records += checkpoint.restore(i, linears)
            if done < len(blocks):
                stage.restored(i, block)
        else:
            rows = [asdict(r) for r in stage.step(i, block, stream, linears)]
            if checkpoint:
                checkpoint.save(i, linears, rows)
            records += rows
        if i + 1 < len(blocks) and done < len(blocks):
            stream = stage.advance(stream, block)
        block.to("cpu")
        progress(i)
    return records


def selected_linears(block: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    regex = re.compile(pattern)
    return {n: m for n, m in block_linears(block).items() if regex.search(n)}

def model_linears(model: nn.Module, pattern: str = ".*") -> Iterator[tuple[int, str, nn.Linear]]:
    """(block index, name, linear) for every selected linear inside the decoder blocks."""
    for i, block in enumerate(decoder_layers(model)):
        for name, linear in selected_linears(block, pattern).items():
            yield i, name, linear

def mask_fingerprints(model: nn.Module, pattern: str) -> dict[str, str]:
    """SHA-1 of each selected linear's zero pattern, keyed ``block.name``: two models share a sparsity
    pattern exactly when their fingerprints match (a saved and reloaded model, a resumed run)."""
    return {f"{i}.{name}": hashlib.sha1((linear.weight == 0).cpu().numpy().tobytes()).hexdigest()
            for i, name, linear in model_linears(model, pattern)}
