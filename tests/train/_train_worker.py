"""One training process for the DDP and kill/resume tests (run by tests/train, not by pytest).

usage: python _train_worker.py CONFIG_JSON OUT_PT [--resume]
Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them (WORLD_SIZE unset = one process).
Runs Trainer.train_step until max_steps; rank 0 saves every step's loss, the (all-reduced) gradients and
the parameters after the last step to OUT_PT.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    from wave_rt.train.config import TrainConfig
    from wave_rt.train.trainer import Trainer

    config = TrainConfig.from_dict(json.loads(open(argv[1]).read()))
    trainer = Trainer(config)
    if "--resume" in argv:
        trainer.resume()
    losses, grads = [], []
    while trainer.step < config.optim.max_steps:
        rec = trainer.train_step()
        trainer._log(rec)
        losses.append(rec["loss"])
        grads.append({n: p.grad.detach().clone() for n, p in trainer.trainable_tensors().items()})
        if trainer.step % config.run.checkpoint_every == 0:
            trainer.save()
    if trainer.rank == 0:
        params = {n: p.detach().clone() for n, p in trainer.trainable_tensors().items()}
        torch.save({"losses": losses, "grads": grads, "params": params}, argv[2])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
