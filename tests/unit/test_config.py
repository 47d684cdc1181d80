"""config.yaml validation: every error names its YAML path and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from node.cli import main
from node.config import Config, ConfigError, HttpSettings, Peer, load_config

GIB = 1024**3

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _errors(tmp_path: Path, data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, data))
    return info.value.errors


def test_shipped_config_is_valid() -> None:
    config = load_config(REPO / "config.yaml")
    assert config.node.ae_title == "PACSNODE"
    assert config.node.port == 11112
    assert config.embedded_broker
    assert config.completion.quiet_seconds == 10
    assert config.rules[0].models == ["ct-tissue"]
    assert config.rules[0].min_instances == 20
    assert config.rules[0].match["ImageType"].contains == "AXIAL"
    assert config.node.data_dir == (REPO / "data").resolve()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert config == Config(node=config.node, models_dir=config.models_dir, http=config.http)
    assert config.node.data_dir == (tmp_path / "data").resolve()
    assert config.models_dir == (tmp_path / "models").resolve()  # beside the config file
    assert not config.accept_unknown_peers
    # The console: on, local only, its token in the data folder.
    assert config.http == HttpSettings(token_file=(tmp_path / "data" / "console.token").resolve())
    assert (config.http.enabled, config.http.bind_address, config.http.port) == (
        True, "127.0.0.1", 8080,
    )  # fmt: skip


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    with pytest.raises(ValueError, match="frozen"):
        config.accept_unknown_peers = True


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"port": 70000}}, r": node\.port: Input should be less than or equal to 65535"),
        ({"node": {"colour": "red"}}, r": node\.colour: unknown key"),
        ({"node": {"ae_title": "A" * 17}}, r": node\.ae_title: AE title must be at most 16"),
        ({"node": {"ae_title": "  "}}, r": node\.ae_title: AE title must not be empty"),
        ({"peers": [{"ae_title": "CT1", "host": "scanner.local"}]}, r": peers\[0\]\.host: peer host must be an IP address"),
        ({"destinations": {"pacs": {"ae_title": "P", "host": "1.2.3.4"}}}, r": destinations\.pacs\.port: Field required"),
        ({"peers": [{"ae_title": "CT1", "host": "10.0.0.1", "certificate_subject": "CN=ct1, O=H"}]}, r": peers\[0\]\.certificate_subject: certificate_subject must be an RFC 4514 name"),
        ({"peers": [{"ae_title": "CT1", "host": "10.0.0.1", "certificate_sha256": "AB:CD"}]}, r": peers\[0\]\.certificate_sha256: certificate_sha256 must be 64 hex digits"),
        ({"peers": [{"ae_title": "CT1", "host": "10.0.0.1", "certificate_subject": "CN=ct1"}]}, r": peers\[0\]: CT1 pins a TLS certificate, but node\.tls is not set"),
        ({"completion": {"quiet_seconds": 0}}, r": completion\.quiet_seconds: Input should be greater than 0"),
        ({"broker": "amqp://x"}, r": broker: broker must be 'embedded' or a redis:// URL"),
        (
            {"rules": [{"name": "r", "match": {"Modalty": "CT"}, "models": ["ct-tissue"]}]},
            r": rules\[0\]\.match: 'Modalty' is not a DICOM attribute keyword",
        ),
        (
            {"rules": [{"name": "r", "match": {"ImageType": {"contains": "A", "regex": "B"}}, "models": ["ct-tissue"]}]},
            r": rules\[0\]\.match\.ImageType: a condition needs exactly one of",
        ),
        (
            {"rules": [{"name": "r", "match": {"SeriesDescription": {"regex": "(["}}, "models": ["ct-tissue"]}]},
            r": rules\[0\]\.match\.SeriesDescription: invalid regular expression",
        ),
        (
            {"rules": [{"name": "r", "match": {"SliceThickness": {"min": 5, "max": 1}}, "models": ["ct-tissue"]}]},
            r": rules\[0\]\.match\.SliceThickness: min \(5\.0\) is greater than max \(1\.0\)",
        ),
        ({"rules": [{"name": "r", "models": []}]}, r": rules\[0\]\.models: List should have at least 1 item"),
        ({"rules": [{"name": "r", "models": ["nope"]}]}, r": rules\[0\]\.models: rule 'r' names model 'nope', which does not exist; available: ct-bone-demo, ct-tissue"),
        (
            {"rules": [{"name": "r", "models": ["ct-tissue"], "send_to": ["pacs"]}]},
            r": rules\[0\]\.send_to: rule 'r' sends to 'pacs', which is not under destinations; defined: none",
        ),
        (
            {"rules": [{"name": "r", "models": ["ct-tissue"]}, {"name": "r", "models": ["ct-tissue"]}]},
            r": rules\[1\]\.name: rule name 'r' is used twice",
        ),
    ],
)  # fmt: skip
def test_each_error_names_its_path(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(_write(tmp_path, data))
    assert len(info.value.errors) == 1, info.value.errors


def test_certificate_pins_are_normalised() -> None:
    """Pins as openssl prints them: ``subject=`` and a colon-separated upper-case hex."""
    peer = Peer(
        ae_title="CT1", host="10.0.0.1",
        certificate_sha256="sha256 Fingerprint=" + ":".join(["AB"] * 32),
        certificate_subject="subject=CN=ct1,O=General Hospital",
    )  # fmt: skip
    assert peer.certificate_sha256 == "ab" * 32
    assert peer.certificate_subject == "CN=ct1,O=General Hospital"


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    errors = _errors(tmp_path, {"node": {"port": 0, "extra": 1}, "accept_unknown_peers": "maybe"})
    assert sorted(e.split(":")[0] for e in errors) == [
        "accept_unknown_peers",
        "node.extra",
        "node.port",
    ]


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "node: [unclosed"))
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_match_shorthand_and_min_instances_inside_match(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            {"rules": [{"name": "r", "match": {"Modality": "CT", "SliceThickness": 1.5, "min_instances": 7}, "models": ["ct-tissue"]}]},
        )
    )  # fmt: skip
    rule = config.rules[0]
    assert rule.min_instances == 7
    assert rule.match["Modality"].equals == "CT"
    assert rule.match["SliceThickness"].equals == 1.5


def test_redacted_hides_broker_password(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, {"broker": "redis://user:secret@redis:6379/0"}))
    assert config.redacted()["broker"] == "redis://***@redis:6379/0"
    assert "secret" not in str(config.redacted())


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = _write(tmp_path, {"node": {"port": "x"}, "destinations": {"p": {"ae_title": "P"}}})
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.port: Input should be a valid integer" in err
    assert "destinations.p.host: Field required" in err
    assert "destinations.p.port: Field required" in err


def test_a_model_that_cannot_run_here_fails_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.mr_brain_mask import MrBrainMaskModel

    monkeypatch.setattr(
        MrBrainMaskModel,
        "missing_requirements",
        classmethod(lambda cls: "deepbet weights not found at /x/model.pt"),
    )
    rules = [{"name": "brain", "models": ["ct-tissue", "mr-brain-mask"]}]
    with pytest.raises(
        ConfigError,
        match=r": rules\[0\]\.models: model 'mr-brain-mask' cannot run here: deepbet weights "
        r"not found at /x/model\.pt",
    ):
        load_config(_write(tmp_path, {"rules": rules}))


def test_shipped_models_can_run_here() -> None:
    from models.registry import available_models

    assert {name: cls.missing_requirements() for name, cls in available_models().items()} == {
        "ct-tissue": None,
        "mr-brain-mask": None,
        "ct-bone-demo": None,
        "xr-nodule-demo": None,
    }


@pytest.mark.parametrize(
    ("storage", "total", "threshold"),
    [
        ({}, 100 * GIB, 5 * GIB),  # 5 % of a large disk
        ({}, 10 * GIB, 2 * GIB),  # 2 GiB on a small one
        ({"min_free_bytes": 1 * GIB}, 100 * GIB, 1 * GIB),  # set: only what is set counts
        ({"min_free_percent": 1}, 100 * GIB, 1 * GIB),
        ({"min_free_bytes": 3 * GIB, "min_free_percent": 1}, 100 * GIB, 3 * GIB),
        ({"min_free_bytes": 0, "min_free_percent": 0}, 100 * GIB, 0),  # the guard off
    ],
)
def test_disk_guard_threshold(storage: dict[str, Any], total: int, threshold: int) -> None:
    config = Config.model_validate({"storage": storage})
    assert config.storage.threshold_bytes(total) == threshold


class Association:
    """Stands for an association (only its identity matters to the guard)."""


def test_disk_guard_refuses_below_the_threshold_and_warns_once_per_association(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from node.config import StorageSettings
    from node.disk_guard import DiskGuard

    free = shutil.disk_usage(tmp_path).free
    guard = DiskGuard(tmp_path, StorageSettings(min_free_bytes=0))
    association, other = Association(), Association()  # pynetdicom's are threads
    assert guard.refusal(1000, association) is None
    guard.settings = StorageSettings(min_free_bytes=free + GIB)  # as after a reload
    with caplog.at_level("WARNING", logger="node.disk_guard"):
        for _ in range(3):
            reason = guard.refusal(1000, association)
            assert reason is not None
            assert "below the disk guard" in reason
        assert guard.refusal(1000, other) is not None
    assert len(caplog.records) == 2  # once for each association
    guard.settings = StorageSettings(min_free_bytes=0)  # space is back
    assert guard.refusal(1000, association) is None


def test_since_takes_a_duration_or_a_date() -> None:
    import argparse
    from datetime import datetime

    from node.cli import since_time

    now = 1_800_000_000.0
    assert since_time("30m", now) == now - 1800
    assert since_time("12h", now) == now - 12 * 3600
    assert since_time("7d", now) == now - 7 * 86400
    assert since_time("2026-11-30") == datetime(2026, 11, 30).timestamp()
    assert since_time("2026-11-30T08:15") == datetime(2026, 11, 30, 8, 15).timestamp()
    for wrong in ("yesterday", "-3h", "h", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="neither a duration"):
            since_time(wrong, now)
