"""`python train.py …`: the synchronous RL loop (see slime/train.py)."""

from slime.train import main

if __name__ == "__main__":
    main()
