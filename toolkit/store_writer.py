"""Writing a token store (layout in toolkit/token_store.py): shards of exactly shard_tokens tokens, each renamed into
place when complete, and the manifest that says which shards are done and where a rerun continues.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from toolkit.errors import UserError
from toolkit.token_store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    TokenStore,
    read_manifest,
    shard_file,
    write_file_atomically,
    write_manifest,
)


class SplitWriter:
    """Appends one split's documents to shards of exactly shard_tokens tokens (the last one shorter).

    Training shards stream to a temporary file (no shard-sized buffer in memory) that is renamed when full.
    Validation is small (capped) and kept in memory, so a resumable snapshot can save what it holds so far.
    """

    def __init__(
        self,
        store_dir: str,
        split: str,
        shard_tokens: int,
        dtype: str,
        shards: list[dict] | None = None,
        in_memory: bool = False,
    ):
        self.store_dir, self.split, self.shard_tokens, self.dtype = store_dir, split, shard_tokens, np.dtype(dtype)
        self.shards = list(shards or [])
        self.in_memory = in_memory
        self._reset()

    def _reset(self) -> None:
        self.fill = self.documents = self.utf8_bytes = 0
        self.pieces: list[np.ndarray] = []
        self.hash = hashlib.sha256()
        self.file = None

    @property
    def tokens(self) -> int:
        """Tokens written to this split so far, complete shards and the current one."""
        return sum(s["tokens"] for s in self.shards) + self.fill

    def restore(self, ids: np.ndarray, documents: int, utf8_bytes: int) -> None:
        """Continue a shard from a snapshot (validation only)."""
        self.add(ids, np.array([len(ids)]), np.array([0]), 0)
        self.documents, self.utf8_bytes = documents, utf8_bytes

    def add(
        self,
        ids: np.ndarray,
        ends: np.ndarray,
        nbytes: np.ndarray,
        first_doc: int,
        first_offset: int = 0,
        on_shard=None,
    ) -> None:
        """Write consecutive documents first_doc, first_doc+1, ...: `ids` their tokens, `ends` the cumulative end of
        each document in `ids`, `nbytes` their UTF-8 sizes. The first document's first `first_offset` tokens were
        written before (a resumed run). on_shard(record) is called after every shard that completes."""
        pos = 0
        while pos < len(ids):
            take = min(len(ids) - pos, self.shard_tokens - self.fill)
            self._write(ids[pos : pos + take])
            lo, hi = np.searchsorted(ends, [pos, pos + take], side="right")
            self.documents += int(hi - lo)
            self.utf8_bytes += int(nbytes[lo:hi].sum())
            pos += take
            if self.fill == self.shard_tokens:
                k = int(np.searchsorted(ends, pos, side="right"))  # the first document not finished yet
                offset = pos - (int(ends[k - 1]) if k else 0) + (first_offset if k == 0 else 0)
                record = self._finish({"document": first_doc + k, "token": offset if k < len(ends) else 0})
                if on_shard:
                    on_shard(record)

    def _write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        self.hash.update(data.tobytes() if not data.flags.c_contiguous else memoryview(data).cast("B"))
        if self.in_memory:
            self.pieces.append(data.copy())
        else:
            if self.file is None:
                self.file = open(self._path() + ".tmp", "wb")  # noqa: SIM115 - open across add() calls, closed in _finish
            data.tofile(self.file)
        self.fill += len(data)

    def _path(self) -> str:
        return os.path.join(self.store_dir, shard_file(self.split, len(self.shards)))

    def held(self) -> np.ndarray:
        """The current (unfinished) shard's tokens kept in memory."""
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, self.dtype)

    def finish(self) -> dict | None:
        """Close the last, shorter shard (if it has tokens)."""
        return self._finish(None) if self.fill else None

    def _finish(self, end: dict | None) -> dict:
        path = self._path()
        if self.in_memory:
            write_file_atomically(path, self.held().tobytes())
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(path + ".tmp", path)
        record = {
            "file": os.path.basename(path),
            "tokens": self.fill,
            "documents": self.documents,
            "utf8_bytes": self.utf8_bytes,
            "sha256": self.hash.hexdigest(),
        }
        if end is not None:
            record["end"] = end  # where the next shard starts in the source's documents (resume point)
        self.shards.append(record)
        self._reset()
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def start_or_resume(output_dir: str, settings: dict, command: str) -> dict:
    """The manifest to continue from: a fresh one, an interrupted one with the same settings, or a complete one."""
    if os.path.isfile(os.path.join(output_dir, MANIFEST)):
        manifest = read_manifest(output_dir)
        differ = sorted(k for k in settings if manifest.get("settings", {}).get(k) != settings[k])
        if differ:
            state = "a complete store" if manifest.get("complete") else "an unfinished store"
            raise UserError(
                f"'{output_dir}' holds {state} prepared with other settings ({', '.join(differ)} differ; it was made "
                f"by: {manifest.get('command', '?')}); use another --output_dir, or rerun that command"
            )
        if manifest.get("complete"):
            store = TokenStore(output_dir)
            store.verify()
            manifest["_summary"] = f"{output_dir} is already complete and verified: {store.describe()}"
        return manifest
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UserError(f"'{output_dir}' exists and is not a token store; pick a new or empty --output_dir")
    os.makedirs(output_dir, exist_ok=True)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": False,
        "settings": settings,
        "command": command,
    }


def write_manifest_for(manifest: dict, output_dir: str, train, val, complete: bool) -> None:
    manifest["complete"] = complete
    manifest["splits"] = {
        w.split: {
            "tokens": sum(s["tokens"] for s in w.shards),
            "documents": sum(s["documents"] for s in w.shards),
            "utf8_bytes": sum(s["utf8_bytes"] for s in w.shards),
            "shards": w.shards,
        }
        for w in (train, val)
    }
    write_manifest(output_dir, {k: v for k, v in manifest.items() if not k.startswith("_")})


def remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_unlisted(output_dir: str, manifest: dict) -> None:
    """Drop leftovers of an interrupted run: temporary files, and shards or snapshots the manifest does not list."""
    listed = {s["file"] for split in manifest.get("splits", {}).values() for s in split["shards"]}
    partial = (manifest.get("resume") or {}).get("validation_partial")
    if partial:
        listed.add(partial["file"])
    for name in os.listdir(output_dir):
        ours = name.startswith(("train-", "validation-")) and (".bin" in name)
        if (ours and name not in listed) or (name.startswith(MANIFEST) and name != MANIFEST):
            remove_file(os.path.join(output_dir, name))
