"""The token store: a folder of fixed-size token shards plus manifest.json. Here: its layout, the one manifest
schema (started, resumed, completed and read), and the reader. toolkit/data/prepare.py writes the shards.

Layout (FORMAT_VERSION 1):
    STORE/manifest.json            the manifest (schema below)
    STORE/train-00000.bin ...      the training token stream, cut every shard_tokens tokens
    STORE/validation-00000.bin ... the validation token stream (documents held out whole)
    STORE/tokenizer/               the tokenizer that made it (save_pretrained), so training can load it

A shard is the raw little-endian array of token ids (uint16 when the vocabulary fits, else uint32), no header:
nanoGPT's `np.memmap(path, dtype=np.uint16, mode="r")` reads it. Every document is followed by EOS and the
stream is cut at fixed token counts, so a document may continue in the next shard. Block i of a split is
tokens [i*B, (i+1)*B) of its shards concatenated: a global offset -> shard (binary search) + offset, so the cost
of a block does not depend on the store's size, and a block may straddle two shards.

Manifest:
    format, version     FORMAT_NAME, FORMAT_VERSION
    complete            false until the last shard is written; an incomplete store is resumed, never read
    settings            what the bytes depend on; a rerun with other settings is refused
    command             the `toolkit prepare` command that made it (rerun it to finish or rebuild the store)
    tokenizer           fingerprint (sha256 of its JSON), eos_id, vocab_size, name
    dtype, shard_tokens the shards' token type and size
    source, validation  where the documents came from; how validation was held out (fraction, every, max_tokens,
                        source, rule)
    splits              per split: tokens, documents, utf8_bytes, shards [{file, tokens, documents, utf8_bytes,
                        sha256, end}] (`end`: where the next shard starts in the source's documents)
    resume              (incomplete stores only) the document and token the next run starts at, and the
                        validation tokens held so far (validation_partial)
"""

from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right

import numpy as np

from toolkit.errors import UserError

FORMAT_NAME = "gpt2-toolkit token store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
CHECK_TOKENS = 4096  # ids read at each end of every shard when a store is opened (cheap corruption check)


def tokenizer_fingerprint(backend_json: str) -> str:
    """sha256 of the tokenizer's JSON (tokenizers' to_str()) minus truncation/padding, which never change ids here."""
    spec = json.loads(backend_json)
    for key in ("truncation", "padding"):
        spec.pop(key, None)
    return "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def backend_json(tokenizer) -> str:
    """The Rust tokenizer's JSON of a transformers fast tokenizer (or of a tokenizers.Tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise UserError(
            "the tokenizer is not a fast (Rust) tokenizer; use a tokenizer folder with tokenizer.json "
            "or vocab.json + merges.txt"
        )
    return backend.to_str()


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def corrupt_message(store_dir: str, shard: str, problem: str) -> str:
    return (
        f"token store '{store_dir}': shard {shard} {problem}, so it is corrupt; rebuild the store by rerunning "
        "the `toolkit prepare` command in its manifest.json (with a new --output_dir)"
    )


# ---- the manifest file ----


def write_file_atomically(path: str, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: the real name only ever holds a complete file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(store_dir: str, manifest: dict) -> None:
    write_file_atomically(os.path.join(store_dir, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(store_dir: str) -> dict:
    path = os.path.join(store_dir, MANIFEST)
    if not os.path.isdir(store_dir):
        raise UserError(
            f"token store '{store_dir}' does not exist; make it with `toolkit prepare SOURCE --output_dir {store_dir}`"
        )
    if not os.path.isfile(path):
        raise UserError(
            f"'{store_dir}' has no {MANIFEST}, so it is not a token store (or its preparation never wrote one); "
            f"run `toolkit prepare SOURCE --output_dir {store_dir}`"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read '{path}' ({str(err)[:120]}); rerun the `toolkit prepare` command that made the store"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"'{path}' is not a token store manifest; point at a folder made by `toolkit prepare`")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(
            f"token store '{store_dir}' has format version {manifest.get('version')}, this toolkit reads version "
            f"{FORMAT_VERSION}; prepare the store again with this version"
        )
    return manifest


def is_store(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def is_complete_store(path: str) -> bool:
    return is_store(path) and bool(read_manifest(path).get("complete"))


# ---- reading ----


class TokenStream:
    """One split of a store: its shards as one concatenated token array, memory-mapped on first use."""

    def __init__(self, store_dir: str, split: str, shards: list[dict], dtype: str, vocab_size: int):
        self.store_dir, self.split, self.shards = store_dir, split, shards
        self.dtype, self.vocab_size = np.dtype(dtype), vocab_size
        self.starts = [0]
        for shard in shards:
            self.starts.append(self.starts[-1] + shard["tokens"])
        self.n_tokens = self.starts[-1]
        self._maps: dict[int, np.memmap] = {}
        self._pid = None

    def __getstate__(self):  # DataLoader workers and spawn pickle the dataset: send paths, never mapped pages
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None
        return state

    def _map(self, i: int) -> np.ndarray:
        if self._pid != os.getpid():  # a forked process maps the files itself
            self._maps, self._pid = {}, os.getpid()
        if i not in self._maps:
            path = os.path.join(self.store_dir, self.shards[i]["file"])
            self._maps[i] = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.shards[i]["tokens"],))
        return self._maps[i]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split as int64 (copied out of the maps), across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside the {self.split} split's {self.n_tokens}")
        out = np.empty(stop - start, dtype=np.int64)
        i = bisect_right(self.starts, start) - 1
        pos = start
        while pos < stop:
            local = pos - self.starts[i]
            take = min(stop - pos, self.shards[i]["tokens"] - local)
            out[pos - start : pos - start + take] = self._map(i)[local : local + take]
            pos += take
            i += 1
        if len(out) and int(out.max()) >= self.vocab_size:
            shard = self.shards[bisect_right(self.starts, start + int(out.argmax())) - 1]["file"]
            problem = f"holds token id {int(out.max())}, outside the vocabulary of {self.vocab_size}"
            raise UserError(corrupt_message(self.store_dir, shard, problem))
        return out


class TokenStore:
    """A complete store, checked on open: manifest, every shard's size, and the ids at both ends of each shard."""

    def __init__(self, store_dir: str):
        manifest = read_manifest(store_dir)
        if not manifest.get("complete"):
            raise UserError(
                f"token store '{store_dir}' is not complete (its preparation was interrupted); rerun the same "
                f"`toolkit prepare` command to finish it: {manifest.get('command', '')}"
            )
        self.dir, self.manifest = store_dir, manifest
        self.vocab_size, self.eos_id = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eos_id"]
        self.fingerprint = manifest["tokenizer"]["fingerprint"]
        self.dtype = np.dtype(manifest["dtype"])
        self.splits = {
            split: TokenStream(store_dir, split, manifest["splits"][split]["shards"], manifest["dtype"],
                               self.vocab_size)
            for split in SPLITS
        }
        for stream in self.splits.values():
            for shard in stream.shards:
                self._check_shard(shard)

    @property
    def train(self) -> TokenStream:
        return self.splits["train"]

    @property
    def validation(self) -> TokenStream:
        return self.splits["validation"]

    def _check_shard(self, shard: dict) -> None:
        path = os.path.join(self.dir, shard["file"])
        if not os.path.isfile(path):
            raise UserError(corrupt_message(self.dir, shard["file"], "is missing"))
        size, want = os.path.getsize(path), shard["tokens"] * self.dtype.itemsize
        if size != want:
            how = "truncated" if size < want else "too long"
            problem = f"has {size:,} bytes where the manifest says {want:,} ({how})"
            raise UserError(corrupt_message(self.dir, shard["file"], problem))
        with open(path, "rb") as f:
            ends = [np.frombuffer(f.read(CHECK_TOKENS * self.dtype.itemsize), dtype=self.dtype)]
            f.seek(max(0, size - CHECK_TOKENS * self.dtype.itemsize))
            ends.append(np.frombuffer(f.read(), dtype=self.dtype))
        top = max((int(e.max()) for e in ends if len(e)), default=0)
        if top >= self.vocab_size:
            problem = f"holds token id {top}, outside the vocabulary of {self.vocab_size}"
            raise UserError(corrupt_message(self.dir, shard["file"], problem))

    def verify(self) -> None:
        """Compare every shard's sha256 with the manifest (reads the whole store)."""
        for stream in self.splits.values():
            for shard in stream.shards:
                h = hashlib.sha256()
                with open(os.path.join(self.dir, shard["file"]), "rb") as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                if h.hexdigest() != shard["sha256"]:
                    problem = "does not match its sha256 in the manifest"
                    raise UserError(corrupt_message(self.dir, shard["file"], problem))

    def check_tokenizer(self, tokenizer, name: str) -> None:
        """Refuse a run whose tokenizer would read these ids as other tokens."""
        theirs = tokenizer_fingerprint(backend_json(tokenizer))
        if theirs != self.fingerprint:
            raise UserError(
                f"token store '{self.dir}' was made with another tokenizer than '{name}' (fingerprints "
                f"{self.fingerprint[:19]} vs {theirs[:19]}); train with the store's tokenizer "
                f"({os.path.join(self.dir, 'tokenizer')}) or prepare the data again with '{name}'"
            )

    def tokenizer_dir(self) -> str | None:
        path = os.path.join(self.dir, "tokenizer")
        return path if os.path.isdir(path) else None

    def describe(self) -> str:
        n_shards = sum(len(s.shards) for s in self.splits.values())
        return (
            f"{self.train.n_tokens:,} training and {self.validation.n_tokens:,} validation tokens in {n_shards} "
            f"shard(s) of {self.dtype.name}"
        )


# ---- the manifest while a store is built: start or resume, resume points, completion ----


def start_or_resume(output_dir: str, settings: dict, command: str) -> dict:
    """The manifest to continue from: a fresh one, an interrupted one with the same settings, or a complete one
    (verified; its "_summary" says so)."""
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
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": False, "settings": settings,
            "command": command}


def describe_build(manifest: dict, eos_id: int, vocab_size: int, tokenizer_name: str, source: dict,
                   validation_source: dict | None, command: str) -> None:
    """The manifest's description of what is being built (from its settings and the sources)."""
    settings = manifest["settings"]
    manifest.update(
        tokenizer={"fingerprint": settings["tokenizer_fingerprint"], "eos_id": eos_id, "vocab_size": vocab_size,
                   "name": tokenizer_name},
        dtype=settings["dtype"],
        shard_tokens=settings["shard_tokens"],
        source=source,
        command=command,
        validation={"fraction": settings["validation_fraction"], "every": settings["validation_every"],
                    "max_tokens": settings["validation_max_tokens"], "source": validation_source},
    )


def save_resume_point(manifest: dict, output_dir: str, record: dict, train, val) -> None:
    """After each training shard: the state a rerun continues from (where the next shard starts in the source's
    documents, and the validation tokens held so far)."""
    old = (manifest.get("resume") or {}).get("validation_partial")
    saved = None
    if val.fill:
        saved = {"file": f"validation-partial-{len(train.shards):05d}.bin", "tokens": val.fill,
                 "documents": val.documents, "utf8_bytes": val.utf8_bytes}
        write_file_atomically(os.path.join(output_dir, saved["file"]), val.held().tobytes())
    manifest["resume"] = {"document": record["end"]["document"], "token": record["end"]["token"],
                          "validation_partial": saved}
    write_splits(manifest, output_dir, train, val, complete=False)
    if old and old != saved:
        remove_file(os.path.join(output_dir, old["file"]))


def finish_store(manifest: dict, output_dir: str, train, val) -> None:
    """Mark the store complete and drop the resume state and its files."""
    manifest.pop("resume", None)
    write_splits(manifest, output_dir, train, val, complete=True)
    remove_unlisted(output_dir, manifest)


def write_splits(manifest: dict, output_dir: str, train, val, complete: bool) -> None:
    """The manifest with the shards `train` and `val` (prepare.SplitWriter) have written so far."""
    manifest["complete"] = complete
    manifest["splits"] = {
        w.split: {"tokens": sum(s["tokens"] for s in w.shards), "documents": sum(s["documents"] for s in w.shards),
                  "utf8_bytes": sum(s["utf8_bytes"] for s in w.shards), "shards": w.shards}
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
