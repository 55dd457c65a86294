"""Train SmolLM2 to use a Python tool for a few GRPO steps on CPU, on built-in arithmetic problems.

.venv/bin/python -m examples.retool.run [extra slime-train flags]
"""

from __future__ import annotations

import sys

from slime.train import main

if __name__ == "__main__":
    main(
        [
            "--hf-checkpoint",
            "SmolLM2-135M-Instruct",
            "--prompt-data",
            "builtin:arithmetic:train:500:0",
            "--input-key",
            "prompt",
            "--label-key",
            "label",
            "--rollout-shuffle",
            "--custom-generate-function-path",
            "examples.retool.agent:generate",
            "--custom-rm-path",
            "examples.retool.agent:reward",
            "--num-rollout",
            "3",
            "--rollout-batch-size",
            "4",
            "--n-samples-per-prompt",
            "4",
            "--rollout-max-response-len",
            "192",
            "--rollout-temperature",
            "0.8",
            "--lr",
            "2e-6",
            "--output-dir",
            "outputs/retool",
            "--overwrite-output-dir",  # each run of the example replaces the last one's metrics
            *sys.argv[1:],
        ]
    )
