"""Where the CLI writes a model: a temporary sibling folder renamed onto OUT at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergeflow.errors import ConfigError
from mergeflow.storage.objects import LocalStore, StoreSink
from mergeflow.storage.shard_writer import ShardedWriter


class Output:
    """A temporary sibling folder renamed onto OUT at the end, removed on any failure."""

    def __init__(self, out: str, overwrite: bool) -> None:
        self.final = Path(out).expanduser().absolute()
        if self.final.exists() and not overwrite:
            raise ConfigError(f"output {out} already exists; pass --overwrite to replace it")
        if self.final.exists() and not self.final.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)


def write_model(out_dir: Path, base, write, max_shard_size: int, files=None) -> None:
    """Copy the base's small files (or ``files``: name -> bytes, e.g. a grown vocabulary's
    tokenizer and config), then stream the model through ``write(writer)``."""

    store = LocalStore(out_dir)
    if files is None:
        files = {n: base.store.read_bytes(base.prefix + n) for n in base.small_files()}
    for name, data in files.items():
        store.write_bytes(name, data)
    write(ShardedWriter(StoreSink(store), max_shard_size))
