import os
import tomllib
from pathlib import Path

import pytest

from worker.cli.main import flags_to_config, serve_parser
from worker.config import WorkerConfig, load
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def setenv(monkeypatch):
    """`load` reads the process environment (pydantic-settings' env source): each test sets its own."""
    for name in list(os.environ):
        if name.upper().startswith("VLLM_WORKER_"):
            monkeypatch.delenv(name)

    def set_all(env):
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name)
            else:
                monkeypatch.setenv(name, value)

    return set_all


def test_default_toml_equals_builtin_defaults():
    data = tomllib.loads((ROOT / "config" / "default.toml").read_text())
    assert WorkerConfig.model_validate(data) == WorkerConfig()


def test_default_toml_documents_every_field():
    text = (ROOT / "config" / "default.toml").read_text()
    for section_name, section in WorkerConfig.model_fields.items():
        if section_name == "models":
            assert "[[models]]" in text
            continue
        assert f"[{section_name}]" in text
        for field in section.annotation.model_fields:  # type: ignore[union-attr]
            assert f"{field} =" in text, f"{section_name}.{field} missing from config/default.toml"


def test_precedence_defaults_file_env_flags(tmp_path, setenv):
    file = tmp_path / "w.toml"
    file.write_text('[model]\nmax_model_len = 1000\nmax_num_seqs = 7\ndtype = "float32"\n[broker]\nusername = "f"\n')
    env = {"VLLM_WORKER_MODEL__MAX_MODEL_LEN": "3000", "VLLM_WORKER_MODEL__MAX_NUM_SEQS": "9"}
    flags = {"model": {"max_model_len": 4000}}
    setenv(env)
    cfg = load(file, flags)
    assert cfg.model.max_model_len == 4000  # flag beats env
    assert cfg.model.max_num_seqs == 9  # env beats file
    assert cfg.model.dtype == "float32"  # file beats default
    assert cfg.broker.username == "f"
    assert cfg.sessions.max_history_tokens == 1024  # default


def test_password_from_env_is_secret(setenv):
    setenv({"VLLM_WORKER_BROKER__PASSWORD": "s3cret-pw"})
    cfg = load()
    assert cfg.broker.password is not None
    assert cfg.broker.password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in repr(cfg)
    assert "s3cret-pw" not in str(cfg.model_dump())


def test_env_lists_parse_as_json(setenv):
    setenv({"VLLM_WORKER_WORKER__PROJECTS": '["racing"]'})
    assert load().worker.projects == ["racing"]


@pytest.mark.parametrize(
    ("file_text", "env"),
    [
        ("[model]\nno_such_knob = 1\n", {}),
        ("not toml = = =", {}),
        ("", {"VLLM_WORKER_MODEL__MAX_MODEL_LEN": "-5"}),
        ("", {"VLLM_WORKER_BROKER__URL": "http://x"}),
    ],
)
def test_invalid_config_is_a_config_error(tmp_path, file_text, env, setenv):
    file = tmp_path / "w.toml"
    file.write_text(file_text)
    setenv(env)
    with pytest.raises(ConfigError):
        load(file)


def test_a_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "absent.toml")


def test_old_script_flags_in_underscore_and_dash_form():
    old = serve_parser().parse_args(
        [
            "--projects",
            "maze",
            "driving",
            "--model",
            "m",
            "--quantization",
            "awq",
            "--visible_devices",
            "2",
            "--gpu_memory_utilization",
            "0.5",
            "--max_model_len",
            "4096",
            "--max_tokens",
            "100",
            "--max_history_tokens",
            "300",
            "--mqtt_username",
            "u",
            "--mqtt_password",
            "p",
        ]
    )
    new = serve_parser().parse_args(
        [
            "--projects",
            "maze",
            "driving",
            "--model",
            "m",
            "--quantization",
            "awq",
            "--visible-devices",
            "2",
            "--gpu-memory-utilization",
            "0.5",
            "--max-model-len",
            "4096",
            "--max-tokens",
            "100",
            "--max-history-tokens",
            "300",
            "--mqtt-username",
            "u",
            "--mqtt-password",
            "p",
        ]
    )
    assert flags_to_config(old) == flags_to_config(new)
    cfg = load(None, flags_to_config(old))
    assert cfg.worker.projects == ["maze", "driving"]
    assert cfg.model.visible_devices == "2"
    assert cfg.model.gpu_memory_utilization == 0.5
    assert cfg.generation.max_tokens == 100
    assert cfg.sessions.max_history_tokens == 300
    assert cfg.broker.username == "u"


def test_broker_url_endpoint():
    assert load(None, {"broker": {"url": "mqtts://b.example:8884"}}).broker.endpoint() == (
        "b.example",
        8884,
        True,
    )
    assert load(None, {"broker": {"url": "mqtt://10.0.0.1"}}).broker.endpoint() == (
        "10.0.0.1",
        1883,
        False,
    )
    assert load(None, {}).broker.endpoint() == ("127.0.0.1", 1883, False)


def test_password_file_is_read_and_the_inline_password_wins(tmp_path, setenv):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    setenv({"VLLM_WORKER_BROKER__PASSWORD_FILE": str(secret)})
    assert load().broker.secret() == "from-file"
    setenv({"VLLM_WORKER_BROKER__PASSWORD": "inline"})
    assert load().broker.secret() == "inline"
    setenv({"VLLM_WORKER_BROKER__PASSWORD": None, "VLLM_WORKER_BROKER__PASSWORD_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="password_file"):
        load().broker.secret()


@pytest.mark.parametrize(
    "env",
    [
        {"VLLM_WORKER_MODEL__NO_SUCH_KNOB": "1"},  # unknown field: extra="forbid" still speaks
        {"VLLM_WORKER_WORKER__PROJECTS": "[not json"},  # a list must be JSON
    ],
)
def test_bad_environment_is_a_config_error(env, setenv):
    setenv(env)
    with pytest.raises(ConfigError):
        load()


def test_environment_is_case_insensitive_and_ignores_other_variables(setenv):
    setenv({"vllm_worker_model__max_num_seqs": "5", "VLLM_WORKER_X": "1"})
    cfg = load()
    assert cfg.model.max_num_seqs == 5
