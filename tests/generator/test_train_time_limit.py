"""`generator.max_minutes`: a run stops at its wall-clock limit with a checkpoint."""

from __future__ import annotations

from pathlib import Path

from generator.config import GeneratorConfig
from generator.synthetic import synthetic_data
from generator.training import Trainer


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path) -> None:
    data = synthetic_data(frames=24, size=32)
    config = GeneratorConfig(preset="tiny", ngf=4, ndf=4, batch_size=2, max_minutes=1e-6)
    trainer = Trainer(data, config, tmp_path / "ckpt", None)
    result = trainer.run(1000, progress=False, log_every=5)
    assert result.step == 5  # the first log step past the (immediate) deadline
    assert result.checkpoint is not None and result.checkpoint.is_file()
