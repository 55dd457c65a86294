"""`python train_async.py …`: the RL loop with one-step overlap — rollout k + 1 generates while rollout k trains
(the same flags as train.py; it adds --async, see slime/train.py)."""

import sys

from slime.train import main

if __name__ == "__main__":
    main(["--async", *sys.argv[1:]])
