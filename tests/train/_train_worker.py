"""One training process for the DDP, FSDP2 and kill/resume tests (run by tests/train, not by pytest).

usage: python _train_worker.py CONFIG_JSON OUT_PT [--resume] [--stop-after N] [--final]
Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them (WORLD_SIZE unset = one process).
Runs Trainer.train_step until max_steps (or until step N, as if killed right after that step's checkpoint);
rank 0 saves every step's loss, the (all-reduced; FSDP2: gathered) gradients and the parameters after the
last step to OUT_PT. --final also writes the merged final model (Trainer.save_final) into the run folder.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    from wave_rt.train.config import TrainConfig
    from wave_rt.train.sharding import full_tensor
    from wave_rt.train.trainer import Trainer

    config = TrainConfig.from_dict(json.loads(open(argv[1]).read()))
    stop = int(argv[argv.index("--stop-after") + 1]) if "--stop-after" in argv else config.optim.max_steps
    trainer = Trainer(config)
    if "--resume" in argv:
        trainer.resume()
    losses, grads = [], []
    while trainer.step < stop:
        rec = trainer.train_step()
        trainer._log(rec)
        losses.append(rec["loss"])
        # full_tensor is a collective under FSDP2: every rank gathers, in the same order
        grads.append({n: full_tensor(p.grad.detach()).clone() for n, p in trainer.trainable_tensors().items()})
        if trainer.step % config.run.checkpoint_every == 0:
            trainer.save()
    params = {n: full_tensor(p.detach()).clone() for n, p in trainer.trainable_tensors().items()}
    if "--final" in argv:
        trainer.save_final()
    if trainer.rank == 0:
        torch.save({"losses": losses, "grads": grads, "params": params}, argv[2])
    trainer.close()  # leave the group together, the FSDP units dropped first
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
