"""``python -m tests.bench.hfget URL DEST``: download URL to DEST with hf_transfer (PyPI
``hf-transfer``, the Rust downloader huggingface_hub uses when HF_HUB_ENABLE_HF_TRANSFER is
set), the way the benchmark runs it as a download peer: 64 connections (``max_files``) of
10 MiB chunks (huggingface_hub's DOWNLOAD_CHUNK_SIZE), 3 parallel failures and 5 retries
per chunk (what huggingface_hub passes). Exit 0 when it returned without an error.
"""

from __future__ import annotations

import sys

MAX_FILES = 64
CHUNK_SIZE = 10 << 20


def main(argv: list[str]) -> int:
    import hf_transfer  # type: ignore[import-not-found]

    url, dest = argv
    hf_transfer.download(url=url, filename=dest, max_files=MAX_FILES, chunk_size=CHUNK_SIZE,
                         parallel_failures=3, max_retries=5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
