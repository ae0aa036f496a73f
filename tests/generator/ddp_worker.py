"""A training worker for torchrun, used by test_ddp.py (not a test module itself).

usage: torchrun --nproc-per-node N ddp_worker.py OUT STEPS [--fail-rank R] [--device cuda]
Trains the tiny net on a small synthetic target into OUT/checkpoints; rank 0 writes the
loss history to OUT/history.json. With --fail-rank, that rank raises on its second step.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from generator.config import GeneratorConfig
from generator.distributed import leave
from generator.synthetic import synthetic_data
from generator.training import Trainer


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = GeneratorConfig(preset="tiny", ngf=8, ndf=8, batch_size=4,
                             checkpoint_every=10_000, sample_every=10_000)
    trainer = Trainer(synthetic_data(frames=24, size=32), config, args.out / "checkpoints",
                      device=torch.device(args.device))
    if trainer.world.rank == args.fail_rank:
        step = trainer._train_step

        def failing():
            if trainer.step == 1:
                raise RuntimeError(f"injected failure on rank {args.fail_rank}")
            return step()

        trainer._train_step = failing
    result = trainer.run(args.steps, progress=False)
    if trainer.world.is_main:
        (args.out / "history.json").write_text(json.dumps(result.history))
    leave(trainer.world)


if __name__ == "__main__":
    main()
