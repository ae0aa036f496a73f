"""Config loading: YAML layers, --set overrides, and errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from streamer.cli.config import DEFAULT_CONFIG, Config, ConfigError, load_config


def test_default_yaml_matches_the_dataclasses() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert data == dataclasses.asdict(Config())


def test_layers_and_overrides(tmp_path: Path) -> None:
    extra = tmp_path / "c.yaml"
    extra.write_text("renderer:\n  resolution: 512\ntracker:\n  huber_px: 2\n")
    cfg = load_config(extra, ["renderer.window=5", "streamer.synthetic_mark=false"])
    assert cfg.renderer.resolution == 512
    assert cfg.tracker.huber_px == 2.0 and isinstance(cfg.tracker.huber_px, float)
    assert cfg.renderer.window == 5
    assert cfg.streamer.synthetic_mark is False


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'renderer\.nope'"):
        load_config(None, ["renderer.nope=1"])
    extra = tmp_path / "c.yaml"
    extra.write_text("trackr:\n  huber_px: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trackr\.huber_px': no section"):
        load_config(extra)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError,
                       match=r"config key 'renderer\.resolution' expects int, got 'big'"):
        load_config(None, ["renderer.resolution=big"])
    with pytest.raises(ConfigError, match=r"config key 'streamer\.synthetic_mark' expects bool"):
        load_config(None, ["streamer.synthetic_mark=3"])


def test_bad_set_syntax_and_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"--set expects key=value, got 'renderer\.window'"):
        load_config(None, ["renderer.window"])
    with pytest.raises(ConfigError, match=r"config file not found: nope\.yaml"):
        load_config("nope.yaml")


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.main import main

    assert main(["assets", "info", "--set", "tracker.nope=1"]) == 1
    assert capsys.readouterr().err.strip() == "dvp: error: unknown config key 'tracker.nope'"


def test_cli_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "assets" in out and "Live Deep Video Portraits" in out


def test_process_settings_set_torch_threads_and_the_switch_interval() -> None:
    import sys

    import torch

    from streamer.live.process import apply_process_settings

    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    try:
        apply_process_settings(load_config(None, ["streamer.cpu_threads=1",
                                                  "streamer.switch_interval_ms=0.5"]))
        assert torch.get_num_threads() == 1
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        apply_process_settings(load_config(None, ["streamer.cpu_threads=0",
                                                  "streamer.switch_interval_ms=0"]))
        assert torch.get_num_threads() == 1  # 0: left as it was
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
