from pathlib import Path

import pytest

from backend.config import DEFAULT_MODEL_NAME, load_settings
from backend.errors import ConfigError


def test_defaults_follow_label_studio_conventions():
    settings = load_settings()
    assert settings.PORT == 9090
    assert settings.MODEL_NAME == DEFAULT_MODEL_NAME
    assert settings.REDIS_URL is None
    assert not settings.auth_enabled


def test_values_come_from_environment(monkeypatch):
    monkeypatch.setenv("PORT", "9191")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://label-studio:8080/")
    monkeypatch.setenv("device", "CUDA:1")
    settings = load_settings()
    assert settings.PORT == 9191
    assert settings.LABEL_STUDIO_URL == "http://label-studio:8080"
    assert settings.DEVICE == "cuda:1"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DEVICE", "gpu", "DEVICE='gpu': expected auto, cpu, cuda, cuda:N or mps"),
        ("PORT", "http", "PORT='http'"),
        ("LABEL_STUDIO_URL", "localhost:8080", "must start with http:// or https://"),
        ("REDIS_URL", "localhost:6379", "must start with redis://"),
        ("PRECISION", "int4", "PRECISION='int4'"),
        ("MODEL_PRETRAINED", "/nowhere/model.pt", "looks like a path but no such file"),
        ("MODEL_CONFIG", "/nowhere/custom.json", "MODEL_CONFIG=/nowhere/custom.json does not exist"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert expected in str(caught.value)
    assert "environment variables" in str(caught.value)


def test_basic_auth_needs_both_halves_and_never_echoes_the_password(monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret-value")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in str(caught.value)
    assert "s3cret-value" not in str(caught.value)


def test_model_config_sets_model_name_to_its_stem(tmp_path: Path, monkeypatch):
    config = tmp_path / "my-arch.json"
    config.write_text("{}")
    monkeypatch.setenv("MODEL_CONFIG", str(config))
    assert load_settings().MODEL_NAME == "my-arch"
    monkeypatch.setenv("MODEL_NAME", "ViT-B-32")
    with pytest.raises(ConfigError, match="must equal the MODEL_CONFIG file stem 'my-arch'"):
        load_settings()


def test_env_example_and_readme_list_every_setting():
    import sys

    from backend.config import Settings

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "scripts"))
    try:
        import settings_reference
    finally:
        sys.path.pop(0)
    assert (repo / ".env.example").read_text().strip() == settings_reference.env_example().strip()
    readme = (repo / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in readme, f"README's settings table lacks {name}"


def test_an_api_key_without_label_studio_url_is_refused(monkeypatch):
    """Otherwise the key would go to whatever host a /setup request names."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-key-value")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not" in str(caught.value)
    assert "secret-key-value" not in str(caught.value)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://label-studio:8080")
    assert load_settings().LABEL_STUDIO_API_KEY == "secret-key-value"


def test_image_formats_are_pillow_names_checked_at_start(monkeypatch):
    assert load_settings(IMAGE_FORMATS=" jpeg, png ").image_formats == ("JPEG", "PNG")
    monkeypatch.setenv("IMAGE_FORMATS", "JPEG,HEIC")
    with pytest.raises(ConfigError, match="IMAGE_FORMATS.*unknown image format.*HEIC"):
        load_settings()
