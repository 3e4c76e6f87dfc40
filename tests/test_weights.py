"""One model, one name: a GGUF conversion is keyed by the file's content, checked on use, and the model's id is the
operator's own path. Conversions are made here by copying a tiny model into the directory that
engine.weights names for a file's content, so no test converts a real GGUF."""

import json
import os
import shutil

import pytest

from engine import weights
from engine.config import EngineConfig
from engine.engine import LLMEngine
from server.pb.certkv.v1 import inference_pb2 as pb
from tests.helpers import TEST_DEVICE
from tests.serving import channel_to, running_server


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "MODELS_DIR", tmp_path / "models")
    return tmp_path / "models"


def gguf(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def converted(tiny_llama, path, recorded: str | None = None):
    """The conversion of `path` as engine.weights keeps it (the tiny model stands for the converted weights)."""
    digest = weights.file_sha256(path)
    out = weights.conversion_dir(path, digest)
    shutil.copytree(tiny_llama, out)
    (out / weights.SOURCE_FILE).write_text(json.dumps({"sha256": recorded or digest}))
    return out


def test_a_file_never_reuses_another_files_conversion(models_dir, tiny_llama, tmp_path):
    """Serving /b/model.gguf after /a/model.gguf served the first model, even when /b was random bytes: the old
    cache, `<stem>.converted`, is what a name-keyed lookup finds. Now /b is converted on its own, and random bytes
    are a start-up error naming the file."""
    a = gguf(tmp_path / "a" / "model.gguf", b"GGUF model a")
    out = converted(tiny_llama, a)
    assert weights.resolve_model(str(a)) == out
    shutil.copytree(tiny_llama, models_dir / "model.converted")  # the name-keyed cache of earlier versions
    b = gguf(tmp_path / "b" / "model.gguf", os.urandom(4096))
    with pytest.raises(ValueError, match="not a GGUF model"):
        weights.resolve_model(str(b))
    assert not list(models_dir.glob(".tmp-*"))  # a failed conversion leaves nothing behind


def test_a_changed_file_is_not_served_from_its_old_conversion(models_dir, tiny_llama, tmp_path):
    a = gguf(tmp_path / "a" / "model.gguf", b"GGUF model a")
    converted(tiny_llama, a)
    a.write_bytes(b"GGUF model a, edited in place")
    with pytest.raises(ValueError, match="not a GGUF model"):
        weights.resolve_model(str(a))


def test_a_stale_conversion_is_refused(models_dir, tiny_llama, tmp_path):
    a = gguf(tmp_path / "a" / "model.gguf", b"GGUF model a")
    out = converted(tiny_llama, a, recorded="0" * 64)  # records some other content
    with pytest.raises(ValueError, match="does not match the file's content"):
        weights.resolve_model(str(a))
    (out / weights.SOURCE_FILE).unlink()  # a directory that records nothing is not trusted either
    with pytest.raises(ValueError, match="does not match"):
        weights.resolve_model(str(a))


async def test_the_models_id_is_the_operators_path(models_dir, tiny_llama, tmp_path):
    a = gguf(tmp_path / "a" / "model.gguf", b"GGUF model a")
    out = converted(tiny_llama, a)
    engine = LLMEngine(EngineConfig(model=str(a), num_kv_blocks=16, kv_mode="dense", device=TEST_DEVICE))
    assert engine.spec.model_id == str(a) and engine.runner.path == out
    async with running_server(a, num_kv_blocks=16) as server:
        async with channel_to(server) as (stub, _):
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_id == str(a)
