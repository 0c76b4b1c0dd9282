"""One rank of the gloo test of info_nce_distributed (run by tests/kernels/test_info_nce.py, not by pytest).

usage: python _dist_info_nce_worker.py RANK WORLD INIT_FILE CASES_PT OUT_DIR

CASES_PT holds a list of cases, each with the global batch (q_all [W*B, D], d_all in the documented global
order: all positives by rank, then all extra negatives by rank) and the options. This rank takes its own
slice, runs info_nce_distributed + backward, and saves loss and gradients to OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    rank, world = int(argv[1]), int(argv[2])
    init_file, cases_path, out_dir = argv[3], argv[4], argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from wave_rt.kernels import _dispatch as dispatch
    from wave_rt.kernels.contrastive import _info_nce_distributed

    dispatch.poison_outputs = True
    results = []
    try:
        for case in torch.load(cases_path, weights_only=True):
            b, e = case["b"], case["e"]
            q_all, d_all = case["q"], case["d"]
            q = q_all[rank * b:(rank + 1) * b].clone().requires_grad_()
            d = torch.cat([d_all[rank * b:(rank + 1) * b],
                           d_all[world * b + rank * e: world * b + (rank + 1) * e]]).clone().requires_grad_()
            t = torch.tensor(case["t"], requires_grad=True) if case["learn_t"] else case["t"]
            with dispatch.force_backend(case["backend"]):
                loss = _info_nce_distributed(q, d, t, None, case["symmetric"], case["margin"],
                                             chunk_rows=case["chunk"])
                (loss * case["scale"]).backward()
            results.append({"loss": loss.detach(), "q_grad": q.grad, "d_grad": d.grad,
                            "t_grad": t.grad if case["learn_t"] else None})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
