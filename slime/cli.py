"""`slime` command: `slime train …` (the RL loop), `slime serve …` (an engine server), `slime convert CKPT OUT`,
`slime report RUN_DIR` (a run's HTML page), `slime data prepare NAME OUT.jsonl` (a dataset in slime's JSONL)."""

from __future__ import annotations

import argparse
import sys


def convert_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="slime convert",
        description="Export the policy of a slime checkpoint as a Hugging Face folder (safetensors, config, "
        "tokenizer) that AutoModelForCausalLM.from_pretrained loads.",
    )
    p.add_argument("checkpoint", help="a --save folder (its newest complete checkpoint) or one iter_XXXXXXX folder")
    p.add_argument("output", help="folder to write; replaced whole once the export is complete")
    args = p.parse_args(argv)
    from slime.trainer.checkpoint import convert

    try:
        out = convert(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError) as exc:
        p.exit(1, f"slime convert: {exc}\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "slime.train",
        "serve": "slime.engine.server",
        "convert": None,
        "report": "slime.observe.report",
        "data": None,
    }
    if not argv or argv[0] not in commands:
        sys.exit(f"usage: slime {{{','.join(commands)}}} [options]   (slime COMMAND --help for each)")
    command, rest = argv[0], argv[1:]
    if command == "convert":
        convert_main(rest)
        return
    if command == "data":
        if not rest or rest[0] != "prepare":
            sys.exit("usage: slime data prepare NAME OUT.jsonl [--source FILE]   (slime data prepare --help)")
        from slime.data.prepare import main as prepare_main

        prepare_main(rest[1:])
        return
    import importlib

    importlib.import_module(commands[command]).main(rest)


if __name__ == "__main__":
    main()
