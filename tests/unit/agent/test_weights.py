"""Stage bundles on the agent: only the stage's tensors, chunks checked and resumable, installs atomic."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from agent.weights import BundleError, BundleStore
from engine import wire
from engine.agent_client import stage_bundle, weight_chunks


@pytest.fixture()
def model_dir(tmp_path):
    """A safetensors model of 3 layers with a config; float32 tensors of known values."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((16, 8), dtype=np.float32),
               "model.norm.weight": np.ones(8, dtype=np.float32),
               "lm_head.weight": rng.standard_normal((16, 8), dtype=np.float32)}
    for i in range(3):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal((300_000,), dtype=np.float32)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.full(8, i, dtype=np.float32)
    save_file(tensors, path / "model.safetensors")
    return path


def host_stage(bundle) -> wire.HostStage:
    return wire.HostStage(model="m", bundle=bundle.bundle_id, start=0, end=1, dtype="fp32", stage_index=0, n_stages=2,
                          next_endpoint="tcp://127.0.0.1:9", next_key="k" * 40, prev_key="k" * 40,
                          config_json=bundle.config_json, tensors=bundle.tensors)


def test_a_bundle_holds_exactly_the_stage_tensors(model_dir):
    first = {t.name for t in stage_bundle(model_dir, 0, 1).tensors}
    assert first == {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                     "model.layers.0.input_layernorm.weight"}
    middle = {t.name for t in stage_bundle(model_dir, 1, 2).tensors}
    assert middle == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"}
    last = {t.name for t in stage_bundle(model_dir, 2, 3).tensors}
    assert "model.norm.weight" in last and "lm_head.weight" not in last


def test_hashes_are_cached_and_follow_the_file(model_dir, tmp_path):
    bundle = stage_bundle(model_dir, 0, 1, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "manifests.json").exists()
    assert stage_bundle(model_dir, 0, 1, cache_dir=tmp_path / "cache") == bundle


def test_transfer_resumes_and_installs_a_loadable_file(model_dir, tmp_path):
    bundle = stage_bundle(model_dir, 0, 1)
    store = BundleStore(tmp_path / "agent-models")
    receiving = store.receive(host_stage(bundle))
    chunks = list(weight_chunks(bundle, tuple(receiving.have)))
    assert len(chunks) > 3 and max(len(c.data) for c in chunks) <= wire.MAX_CHUNK_BYTES
    for chunk in chunks[:3]:
        receiving.write(chunk)
    assert store.installed(bundle.bundle_id) is None
    resumed = store.receive(host_stage(bundle))  # a new connection: what is on disk counts
    assert resumed.have == receiving.have and resumed.done == sum(len(c.data) for c in chunks[:3])
    for chunk in weight_chunks(bundle, tuple(resumed.have)):
        resumed.write(chunk)
    assert resumed.complete
    path = resumed.install()
    assert store.installed(bundle.bundle_id) == path and store.bundles() == [bundle.bundle_id]
    loaded = load_file(path / "model.safetensors")
    original = {}
    with safe_open(model_dir / "model.safetensors", "np") as f:
        for t in bundle.tensors:
            original[t.name] = f.get_tensor(t.name)
    assert set(loaded) == set(original)
    assert all(np.array_equal(loaded[k], original[k]) for k in original)
    assert not (store.partial_root / bundle.bundle_id).exists()


def test_bad_chunks_are_refused(model_dir, tmp_path):
    bundle = stage_bundle(model_dir, 0, 1)
    receiving = BundleStore(tmp_path / "m").receive(host_stage(bundle))
    chunk = next(weight_chunks(bundle, tuple(receiving.have)))
    corrupt = wire.WeightChunk(chunk.bundle, chunk.tensor, chunk.offset, bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:], chunk.sha256)
    with pytest.raises(BundleError, match="sha256"):
        receiving.write(corrupt)
    receiving.write(chunk)
    with pytest.raises(BundleError, match="starts at byte 0"):
        receiving.write(chunk)  # a replayed chunk
    with pytest.raises(BundleError, match="bundle"):
        receiving.write(wire.WeightChunk("f" * 64, 0, 0, b"x", hashlib.sha256(b"x").hexdigest()))
    with pytest.raises(BundleError, match="tensor 99"):
        receiving.write(wire.WeightChunk(chunk.bundle, 99, 0, b"x", hashlib.sha256(b"x").hexdigest()))


def test_a_tensor_that_fails_its_check_is_asked_for_again(model_dir, tmp_path):
    bundle = stage_bundle(model_dir, 0, 1)
    store = BundleStore(tmp_path / "m")
    receiving = store.receive(host_stage(bundle))
    for chunk in weight_chunks(bundle, tuple(receiving.have)):
        receiving.write(chunk)
    part = receiving.dir / "0.part"
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="failed their sha256 check"):
        receiving.install()
    assert receiving.have[0] == 0 and store.installed(bundle.bundle_id) is None


def test_a_manifest_that_does_not_match_its_id_is_refused(model_dir, tmp_path):
    bundle = stage_bundle(model_dir, 0, 1)
    msg = host_stage(bundle)
    forged = wire.HostStage(**{f: getattr(msg, f) for f in msg.__struct_fields__ if f != "bundle"}, bundle="0" * 64)
    with pytest.raises(BundleError, match="does not match"):
        BundleStore(tmp_path / "m").receive(forged)


def test_written_safetensors_header_is_aligned(model_dir, tmp_path):
    bundle = stage_bundle(model_dir, 1, 2)
    receiving = BundleStore(tmp_path / "m").receive(host_stage(bundle))
    for chunk in weight_chunks(bundle, tuple(receiving.have)):
        receiving.write(chunk)
    with open(receiving.install() / "model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    assert size % 8 == 0
