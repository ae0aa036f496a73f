"""A training worker for torchrun, used by test_ddp.py (not a test module itself).

usage: torchrun --nproc-per-node N ddp_worker.py OUT STEPS [FAIL_RANK]
Trains the tiny net on a small synthetic target into OUT/checkpoints; rank 0 writes the
loss history to OUT/history.json. With FAIL_RANK, that rank raises on its second step.
"""

import json
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from generator.config import GeneratorConfig
from generator.distributed import leave
from generator.synthetic import synthetic_data
from generator.training import Trainer


@record
def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    fail_rank = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    config = GeneratorConfig(preset="tiny", ngf=8, ndf=8, batch_size=4,
                             checkpoint_every=10_000, sample_every=10_000)
    trainer = Trainer(synthetic_data(frames=24, size=32), config, out / "checkpoints")
    if trainer.world.rank == fail_rank:
        step = trainer._train_step

        def failing():
            if trainer.step == 1:
                raise RuntimeError(f"injected failure on rank {fail_rank}")
            return step()

        trainer._train_step = failing
    result = trainer.run(steps, progress=False)
    if trainer.world.is_main:
        (out / "history.json").write_text(json.dumps(result.history))
    leave(trainer.world)


if __name__ == "__main__":
    main()
