"""Model files: round trip, integrity (checksums, pickles refused, format version), the registry."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from LTDiffPPLib import modelcard, modelfile
from LTDiffPPLib.errors import ModelFileError, OutputError
from LTDiffPPLib.modelfile import FORMAT, init_model, load_model, read_metadata, save_model, sha256_file
from conftest import TINY


def test_round_trip_is_exact(tiny_model, tiny_model_path, tmp_path):
    out = tmp_path / "copy.safetensors"
    digest = save_model(tiny_model.net, out, tiny_model.metadata)
    assert digest == sha256_file(out)
    again = load_model(out)
    for (k, a), (k2, b) in zip(tiny_model.net.state_dict().items(), again.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert again.metadata["config"] == tiny_model.metadata["config"]
    assert again.metadata["target_kernel"] == "B70f"
    assert not again.net.training


def test_float16_storage_halves_the_file(tiny_model, tiny_model_path, tmp_path):
    out = tmp_path / "half.safetensors"
    save_model(tiny_model.net, out, tiny_model.metadata, weights_dtype="float16")
    assert out.stat().st_size < 0.6 * tiny_model_path.stat().st_size
    half = load_model(out)
    assert half.metadata["weights_dtype"] == "float16"
    for a, b in zip(tiny_model.net.parameters(), half.net.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_existing_file_is_not_overwritten_unless_asked(tiny_model_path, tmp_path):
    before = tiny_model_path.read_bytes()
    with pytest.raises(OutputError):
        init_model(tiny_model_path, TINY, seed=5)
    assert tiny_model_path.read_bytes() == before


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickles_are_refused_without_unpickling(tmp_path, how):
    path = tmp_path / "evil.safetensors"
    marker = tmp_path / "pwned"
    if how == "torch.save":
        torch.save({"w": torch.zeros(1)}, path)
    else:

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError, match="never unpickles"):
        load_model(path)
    assert not marker.exists()


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ModelFileError, match="garbage.safetensors"):
        load_model(garbage)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def _rewrite_header(src, dst, keep_digest: bool = False, **changes):
    """A copy of model file ``src`` with header fields changed; without ``keep_digest`` the copy carries no
    embedded digest (a file written before digests, or by hand), so the checks behind it are reached."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header.update(changes)
    if not keep_digest:
        header.pop(modelfile.DIGEST_KEY, None)
    save_file(tensors, str(dst), metadata=header)


def test_wrong_format_version_is_refused(tiny_model_path, tmp_path):
    future = tmp_path / "future.safetensors"
    _rewrite_header(tiny_model_path, future, format_version="99")
    with pytest.raises(ModelFileError, match="format version '99' is not supported"):
        load_model(future)
    other = tmp_path / "other.safetensors"
    _rewrite_header(tiny_model_path, other, format="something-else")
    with pytest.raises(ModelFileError, match="not an LTDiffPP model file"):
        read_metadata(other)


def test_metadata_disagreeing_with_weights_is_refused(tiny_model_path, tmp_path):
    meta = read_metadata(tiny_model_path)
    meta["config"]["latent_channels"] = 8
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(tiny_model_path, bad, ltdiffpp=json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not match the architecture"):
        load_model(bad)
    del meta["hu"]
    _rewrite_header(tiny_model_path, bad, ltdiffpp=json.dumps(meta))
    with pytest.raises(ModelFileError, match="lacks"):
        load_model(bad)


@pytest.fixture
def temp_registry(tmp_path, monkeypatch, tiny_model_path):
    """A registry in a temporary resources folder holding one copy of the tiny model."""
    res = tmp_path / "resources"
    (res / "models").mkdir(parents=True)
    model = res / "models" / "tiny.safetensors"
    model.write_bytes(tiny_model_path.read_bytes())
    entry = {"name": "tiny", "file": "tiny.safetensors", "sha256": sha256_file(model), "source_kernel": "B30f",
             "target_kernel": "B70f", "description": "test"}
    (res / "registry.json").write_text(json.dumps({"format_version": 1, "default": "tiny", "models": [entry]}))
    monkeypatch.setattr(modelcard, "RESOURCES", res)
    monkeypatch.setattr(modelcard, "REGISTRY_PATH", res / "registry.json")
    return model


def test_registry_name_and_default_resolve_with_checksum(temp_registry):
    assert load_model("tiny").path == temp_registry
    assert load_model(None).metadata["name"] == "tiny-test"


def test_tampered_registered_model_is_refused(temp_registry):
    data = bytearray(temp_registry.read_bytes())
    expected = sha256_file(temp_registry)
    data[-10] ^= 0x01  # one bit in the last tensor's data: the file still parses
    temp_registry.write_bytes(bytes(data))
    actual = sha256_file(temp_registry)
    with pytest.raises(ModelFileError, match="checksum mismatch") as exc:
        load_model("tiny")
    assert expected in str(exc.value) and actual in str(exc.value)


def test_unknown_name_lists_registered_models(temp_registry):
    with pytest.raises(ModelFileError, match=r"registered: tiny"):
        load_model("br40-to-bl64")


def test_no_default_model_says_so(tmp_path, monkeypatch):
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"format_version": 1, "default": None, "models": []}))
    monkeypatch.setattr(modelcard, "REGISTRY_PATH", reg)
    with pytest.raises(ModelFileError, match="no default model is shipped"):
        load_model(None)


def test_shipped_registry_is_consistent():
    """Every model the package ships exists and matches its registered checksum."""
    entries, default = modelfile.registry()
    assert default is None or default in {e.name for e in entries}
    for e in entries:
        assert e.path.is_file(), e.path
        assert sha256_file(e.path) == e.sha256, e.name
        assert read_metadata(e.path)["target_kernel"] == e.target_kernel
        assert e.path.stat().st_size <= 25 * 2**20


def test_header_is_plain_json_metadata(tiny_model_path):
    n = int.from_bytes(tiny_model_path.read_bytes()[:8], "little")
    header = json.loads(tiny_model_path.read_bytes()[8 : 8 + n])
    assert header["__metadata__"]["format"] == FORMAT
    assert json.loads(header["__metadata__"]["ltdiffpp"])["source_kernel"] == "B30f"
