"""Stage bundles on the agent's disk: received in chunks, resumable, checked, installed atomically.

Layout under the models directory:

    bundles/<bundle id>/            config.json, model.safetensors (only the stage's tensors), .complete
    bundles/.partial/<bundle id>/   manifest.json and <i>.part per tensor while receiving

A chunk is written only if its sha256 matches and it starts where the tensor's part file ends, so
the size of a part file is how many bytes of that tensor are held: after a broken connection the
agent asks for the rest (WeightsNeeded.have). When every tensor is whole, each is checked against
its sha256 in the manifest, the safetensors file is written into a temporary directory and that
directory is renamed into place: a bundle directory exists only when complete, and nothing
half-written is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from engine import wire
from engine.agent_client import bundle_id

logger = logging.getLogger(__name__)

COMPLETE = ".complete"
_BLOCK = 8 * 1024 * 1024


class BundleError(ValueError):
    """A chunk or a bundle is not acceptable; the text says why."""


class BundleStore:
    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir) / "bundles"
        self.partial_root = self.root / ".partial"
        self.partial_root.mkdir(parents=True, exist_ok=True)

    def installed(self, bundle: str) -> Path | None:
        path = self.root / bundle
        return path if (path / COMPLETE).is_file() else None

    def bundles(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / COMPLETE).is_file())

    def receive(self, msg: wire.HostStage) -> Receiving:
        """Start or resume receiving the bundle that `msg` describes."""
        if bundle_id(msg.config_json, msg.tensors) != msg.bundle:
            raise BundleError("the bundle id does not match its manifest; the client must send a consistent HostStage")
        return Receiving(self, msg.bundle, msg.config_json, msg.tensors)


class Receiving:
    """One bundle being received; `have[i]` bytes of tensor i are on disk."""

    def __init__(self, store: BundleStore, bundle: str, config_json: str, tensors: tuple[wire.TensorEntry, ...]) -> None:
        self.store, self.bundle, self.config_json, self.tensors = store, bundle, config_json, tensors
        self.dir = store.partial_root / bundle
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if not manifest.exists():
            manifest.write_text(json.dumps({"config": config_json, "tensors": [t.name for t in tensors]}))
        self.have = [min(self._part(i).stat().st_size, t.nbytes) if self._part(i).exists() else 0
                     for i, t in enumerate(tensors)]

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def done(self) -> int:
        return sum(self.have)

    @property
    def complete(self) -> bool:
        return all(h == t.nbytes for h, t in zip(self.have, self.tensors))

    def _part(self, index: int) -> Path:
        return self.dir / f"{index}.part"

    def write(self, chunk: wire.WeightChunk) -> None:
        """Append a chunk; BundleError if it is for another bundle, misplaced or corrupt."""
        if chunk.bundle != self.bundle:
            raise BundleError(f"chunk for bundle {chunk.bundle[:12]} while receiving {self.bundle[:12]}")
        if chunk.tensor >= len(self.tensors):
            raise BundleError(f"chunk for tensor {chunk.tensor}, but the bundle has {len(self.tensors)}")
        entry = self.tensors[chunk.tensor]
        if chunk.offset != self.have[chunk.tensor]:
            raise BundleError(f"chunk of {entry.name} starts at byte {chunk.offset}, but {self.have[chunk.tensor]} are held")
        if chunk.offset + len(chunk.data) > entry.nbytes:
            raise BundleError(f"chunk of {entry.name} runs past its {entry.nbytes} bytes")
        if hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
            raise BundleError(f"chunk of {entry.name} at byte {chunk.offset} fails its sha256 check")
        with open(self._part(chunk.tensor), "ab") as handle:
            handle.write(chunk.data)
        self.have[chunk.tensor] += len(chunk.data)

    def install(self) -> Path:
        """Check every tensor's sha256, write the bundle and rename it into place; return its path.

        A tensor that fails its check is deleted (so it is asked for again) and BundleError raised.
        """
        bad = [i for i, t in enumerate(self.tensors) if _file_sha256(self._part(i)) != t.sha256]
        for index in bad:
            self._part(index).unlink()
            self.have[index] = 0
        if bad:
            raise BundleError(f"{len(bad)} tensors failed their sha256 check (first {self.tensors[bad[0]].name}); "
                              "they will be sent again")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.bundle[:12]}-", dir=self.store.root))
        try:
            (tmp / "config.json").write_text(self.config_json, encoding="utf-8")
            self._write_safetensors(tmp / "model.safetensors")
            (tmp / COMPLETE).write_text(self.bundle + "\n")
            target = self.store.root / self.bundle
            if target.exists():  # an incomplete leftover of an older version
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.dir, ignore_errors=True)
        logger.info("installed stage bundle %s (%d tensors, %d bytes)", self.bundle[:12], len(self.tensors), self.total)
        return target

    def _write_safetensors(self, path: Path) -> None:
        header, offset = {}, 0
        for entry in self.tensors:
            header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for index in range(len(self.tensors)):
                with open(self._part(index), "rb") as part:
                    shutil.copyfileobj(part, out, _BLOCK)
            out.flush()
            os.fsync(out.fileno())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
