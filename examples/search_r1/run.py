"""Train SmolLM2 as a search agent for a few GRPO steps on CPU.

    .venv/bin/python -m examples.search_r1.run [extra slime-train flags]

Writes the questions to outputs/search_r1/train.jsonl (the index is rebuilt from the same seed in the rollout
process), then runs the ordinary training entry point with the agent's generate and reward functions.
"""

from __future__ import annotations

import json
import os
import sys

from examples.search_r1.corpus import build_corpus, questions
from slime.train import main

OUT = "outputs/search_r1"


def write_data() -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "train.jsonl")
    with open(path, "w") as f:
        for row in questions(build_corpus()[1]):
            f.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    main(
        [
            "--hf-checkpoint",
            "SmolLM2-135M-Instruct",
            "--prompt-data",
            write_data(),
            "--input-key",
            "prompt",
            "--label-key",
            "label",
            "--rollout-shuffle",
            "--custom-generate-function-path",
            "examples.search_r1.agent:generate",
            "--custom-rm-path",
            "examples.search_r1.agent:reward",
            "--num-rollout",
            "3",
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--rollout-max-response-len",
            "160",
            "--rollout-temperature",
            "0.8",
            "--lr",
            "2e-6",
            "--output-dir",
            OUT,
            "--overwrite-output-dir",  # each run of the example replaces the last one's metrics
            *sys.argv[1:],
        ]
    )
