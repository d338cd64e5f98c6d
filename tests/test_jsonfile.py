"""slope.serialization.jsonfile.read_json_object: one reader for the JSON files that must hold an
object, strict (the caller's one-line error, with the reason) or lenient (None)."""
import pytest

from slope.serialization.jsonfile import read_json_object


def _fail(why):
    return RuntimeError(f"bad file ({why})")


@pytest.mark.parametrize("content, why", [
    (b'{"a": [1, 2]', "not valid JSON: "),
    (b"\xff\xfe not utf-8", "not valid JSON: "),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"text"', "expected a JSON object, got str"),
])
def test_anything_but_an_object_is_the_callers_error_or_none(tmp_path, content, why):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(RuntimeError, match=r"^bad file \(" + why):
        read_json_object(path, _fail)
    assert read_json_object(path) is None


def test_an_object_is_returned_and_a_missing_file_raises_only_when_strict(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('{"a": {"b": 1}}', encoding="utf-8")
    assert read_json_object(path) == read_json_object(str(path), _fail) == {"a": {"b": 1}}
    assert read_json_object(tmp_path / "missing.json") is None
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "missing.json", _fail)


def test_callers_keep_their_messages(tmp_path):
    """A few of its callers: the checkpoint manifest, a model config file, a lock file's holder."""
    from slope.checkpoint import CheckpointError, verify_checkpoint
    from slope.config import ConfigError, TrainConfig
    from slope.model_config import causal_lm_config
    from slope.runlock import RunLock

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"manifest.json is corrupt \(expected a JSON object, got list\); delete"):
        verify_checkpoint(tmp_path / "ckpt")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"config.json is not a JSON object \(not valid JSON: "):
        causal_lm_config(TrainConfig(model_config=str(tmp_path / "config.json")), 128, 0)
    lock = RunLock(tmp_path)
    lock.path.write_text("[]")
    assert lock._holder() == {}
