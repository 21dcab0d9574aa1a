"""Scenario 13 of issue 20: loading a model through the mount, cold.

The object is a ~1 GiB safetensors file (``model/model.safetensors``: 64 float32 tensors
of 4 Mi elements, 16 MiB each, plus a small one; their bytes are tests/content.py's), made
here without the ``safetensors`` package: an 8-byte little-endian header length, the JSON
header (names, dtypes, shapes, data offsets), the tensors' bytes. What is timed is what a
program that loads a checkpoint does: ``safetensors.safe_open(path, framework="np")`` and
``get_tensor`` of every tensor (PyPI ``safetensors`` with ``numpy``, installed into the
bench's environment when this scenario runs), from the open to the last tensor in memory;
the loaded bytes are then checked against the file's (sha256 of the tensors in name
order), untimed. rangefs: through a fresh mount with the page cache dropped (the load reads
through the kernel's mmap of the FUSE file); the download peers: the download (page cache
dropped first) and then the same load of the local file: time from the start of the
download to the last tensor. Figures: seconds to done and, for rangefs, the daemon's CPU
seconds from the open on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

from tests.content import iter_content

from .peers import Mounted, Peer
from .scenarios import REPO, Ctx, Figures, _cpu_since, _download_argv, _fuse, worker
from .system import drop_page_cache, run_measured

MiB = 1 << 20
KEY = "bench-model"
TENSORS = 64  # of TENSOR_ELEMENTS float32 each (16 MiB), plus "norm.weight"
TENSOR_ELEMENTS = 4 << 20


def layout(quick: bool) -> list[tuple[str, list[int]]]:
    """(name, shape) of every float32 tensor, in name order (= file order)."""
    count = TENSORS // 4 if quick else TENSORS
    tensors = [(f"layers.{i:03d}.weight", [2048, TENSOR_ELEMENTS // 2048]) for i in range(count)]
    return sorted([*tensors, ("norm.weight", [4096])])


def header(tensors: list[tuple[str, list[int]]]) -> bytes:
    """The safetensors head: u64 LE length, then the JSON header padded with spaces to 8."""
    meta: dict[str, object] = {"__metadata__": {"format": "np"}}
    at = 0
    for name, shape in tensors:
        size = 4 * _count(shape)
        meta[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _count(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def data_size(tensors: list[tuple[str, list[int]]]) -> int:
    return sum(4 * _count(shape) for _, shape in tensors)


def populate(root: Path, quick: bool) -> str:
    """Write ``root/model/model.safetensors`` unless it is there with the right size;
    returns the sha256 of its tensors' bytes (the data section)."""
    tensors = layout(quick)
    head = header(tensors)
    size = data_size(tensors)
    path = root / "model" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != len(head) + size:
        with open(path, "wb") as fh:
            fh.write(head)
            for offset in range(0, size, 64 << 20):
                fh.write(b"".join(iter_content(KEY, offset, min(64 << 20, size - offset))))
    digest = hashlib.sha256()
    for part in iter_content(KEY, 0, size):
        digest.update(part)
    return digest.hexdigest()


def model_load(ctx: Ctx, peer: Peer, digest: str) -> Figures:
    """Scenario 13 for one peer: ``s13_s`` (open to the last tensor loaded; download peers:
    download + load) and rangefs's ``s13_cpu_s`` (the daemon's, from the open on)."""
    timeout = 300.0
    if peer.kind == "download":
        dl = ctx.fresh("dl")
        try:
            drop_page_cache()
            url = ctx.origin.url("model/model.safetensors")
            code, seconds, _, _ = run_measured(
                _download_argv(peer, url, dl, "model.safetensors"), timeout=timeout, cwd=REPO)
            if code != 0:
                return {"error": "download failed or timed out"}
            loaded = worker({"op": "safetensors", "path": str(dl / "model.safetensors")},
                            timeout)
        finally:
            shutil.rmtree(dl, ignore_errors=True)
        return _figures(loaded, digest, seconds)

    def body(m: Mounted) -> Figures:
        drop_page_cache()
        before = m.cpu_seconds()
        loaded = worker({"op": "safetensors", "path": m.path("model.safetensors")}, timeout)
        figures = _figures(loaded, digest, 0.0)
        figures["s13_cpu_s"] = _cpu_since(m, before)
        return figures

    return _fuse(ctx, peer, "13", "model", ["model.safetensors"], body)


def _figures(loaded: dict[str, object] | None, digest: str, before: float) -> Figures:
    if loaded is None:
        return {"error": "load failed or timed out"}
    if loaded["digest"] != digest:
        return {"error": f"the loaded tensors differ: sha256 {str(loaded['digest'])[:16]}"}
    seconds = loaded["seconds"]
    assert isinstance(seconds, float)
    return {"s13_s": before + seconds, "s13_tensors": loaded["tensors"]}
