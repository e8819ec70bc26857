"""A real process that saves learner checkpoints (run by test_checkpoint_safety.py, killed with -9).

    python -m tests.reliability.ckpt_child save ROOT MARKER   # save 1, save 1 again, save 2: the 2nd
                                                               # dist_checkpointing.save never returns
    python -m tests.reliability.ckpt_child load ROOT          # load the tracked checkpoint, then save 2

"Never returns" stands in for a slow shared filesystem (the only fake: the kill itself is a real SIGKILL).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    import torch

    from minpro_megatron.learner.checkpoint import latest_iteration, load_checkpoint, load_rank_state, save_checkpoint
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner
    from tests.learner.test_train_step import run_config, step_batch

    mode, root = sys.argv[1], Path(sys.argv[2])
    cfg = run_config()
    init_distributed(cfg.parallel, seed=7)
    learner = Learner(cfg)
    if mode == "save":
        marker = Path(sys.argv[3])
        learner.train_step(step_batch(0))
        save_checkpoint(learner, root, rank_state={"cursor": 1}, iteration=1)
        from megatron.core import dist_checkpointing

        def hold(*args, **kwargs):  # the filesystem stalls: the test kills us here
            marker.write_text("holding")
            time.sleep(3600)

        dist_checkpointing.save = hold
        learner.train_step(step_batch(1))
        # a stop request at a save step saved this iteration again (trainer.run before the fix)
        save_checkpoint(learner, root, rank_state={"cursor": 1}, iteration=1)
        save_checkpoint(learner, root, rank_state={"cursor": 2}, iteration=2)
    else:
        tracked = latest_iteration(root)
        load_checkpoint(learner, root)
        state = load_rank_state(root)
        learner.train_step(step_batch(1))
        save_checkpoint(learner, root, rank_state={"cursor": 2}, iteration=2)
        finite = all(bool(torch.isfinite(p).all()) for p in learner.model[0].parameters())
        print(json.dumps({"tracked": tracked, "state": state, "after": latest_iteration(root), "finite": finite}))


if __name__ == "__main__":
    main()
