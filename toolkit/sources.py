"""Where models, tokenizers and data come from: a local path or a Hub name, and which reader a data file needs."""

from __future__ import annotations

import os

# File extension -> the `datasets` builder that reads it (.txt and friends: plain text).
FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                 ".parquet": "parquet", ".csv": "csv"}


def is_local_path(name_or_path: str) -> bool:
    """A folder, or something written like a path (has a separator or starts with '.'), rather than a Hub name:
    a missing local folder then gets a "does not exist" error instead of a failed Hub download."""
    return os.path.isdir(name_or_path) or os.path.sep in name_or_path or name_or_path.startswith(".")
