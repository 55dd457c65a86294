"""The run's configuration: slime's flags, grouped as slime groups them, settled once and then read-only.

`settle` is the one ordered step from parsed flags to the configuration every process receives: each group checks
its flags and derives its defaults, then placement (which needs the cluster's GPU count) and the engine options
that follow from it, then the router's address; after that the object is frozen. Runtime facts (engine URLs) travel
separately (slime.engine.fleet.Endpoints).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from slime.config.algorithm import add_algorithm_arguments, settle_algorithm
from slime.config.checkpoints import add_checkpoint_arguments, validate_checkpoints
from slime.config.cluster import (
    PlacementError,
    add_cluster_arguments,
    place,
    settle_engine_options,
    settle_router,
    validate_cluster,
)
from slime.config.data import add_data_arguments, settle_num_rollout, validate_data
from slime.config.eval import add_eval_arguments, settle_eval
from slime.config.megatron import add_megatron_arguments, check_architecture, check_tensor_parallel, settle_megatron
from slime.config.observe import add_observe_arguments, settle_observe
from slime.config.reward import add_reward_arguments, validate_reward
from slime.config.rollout import add_rollout_arguments, validate_rollout
from slime.config.training import add_training_arguments, batch_plan, settle_batch_plan, settle_lora

__all__ = ["Settings", "batch_plan", "build_parser", "parse_args", "parse_flags", "settle"]


class Settings(argparse.Namespace):
    """The settled configuration: every flag plus the settings derived from them. Read-only for this project's code
    once settled, so every actor sees the same values (`replace` makes a changed copy). A user's hook may still assign
    to it, as slime's examples do; that changes only the copy in that process, and is logged once per attribute."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_settled"):
            _check_writer(name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self.__dict__.get("_settled"):
            _check_writer(name)
        super().__delattr__(name)

    def replace(self, **changes: Any) -> Settings:
        """A settled copy with `changes` applied (tests, tools and benchmarks that vary one setting)."""
        out = Settings(**{k: v for k, v in vars(self).items() if k != "_settled"})
        for k, v in changes.items():
            setattr(out, k, v)
        out._settled = True
        return out


_HOOK_WRITES: set[str] = set()


def _check_writer(name: str) -> None:
    """Code of this package may not change a settled configuration; anyone else (a hook) may, with a log line."""
    import sys

    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller == "slime" or caller.startswith("slime."):
        raise AttributeError(
            f"args.{name} assigned in {caller}: the configuration is read-only once settled "
            "(slime.config.arguments.settle); derive settings there, or make a changed copy with args.replace(...)"
        )
    if name not in _HOOK_WRITES:
        _HOOK_WRITES.add(name)
        logging.getLogger("slime.config").info("%s set args.%s (this process's copy only)", caller, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slime-train", description="RL post-training: rollout -> reward -> train -> weight sync, in a loop."
    )
    add_cluster_arguments(p)
    add_data_arguments(p)
    add_rollout_arguments(p)
    add_training_arguments(p)
    add_checkpoint_arguments(p)
    add_algorithm_arguments(p)
    add_reward_arguments(p)
    add_eval_arguments(p)
    add_observe_arguments(p)
    add_megatron_arguments(p)
    return p


def apply_custom_config(args: Settings, parser: argparse.ArgumentParser) -> None:
    """--custom-config-path: a YAML mapping whose keys become attributes of args (hooks read them; a key that
    names a flag overrides it), before anything is checked."""
    path = getattr(args, "custom_config_path", None)
    if not path:
        return
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--custom-config-path {path}: {exc}")
    if not isinstance(values, dict) or not all(isinstance(k, str) and k.isidentifier() for k in values):
        parser.error(f"--custom-config-path {path}: expected a mapping of attribute names to values")
    log = logging.getLogger("slime.config")
    for key, value in values.items():
        if hasattr(args, key):
            log.warning("--custom-config-path %s sets %s=%r over %r", path, key, value, getattr(args, key))
        setattr(args, key, value)


def parse_flags(argv: list[str] | None = None) -> tuple[Settings, argparse.ArgumentParser]:
    """The flags as given (argparse's own errors and --help happen here), not yet settled."""
    parser = build_parser()
    args = parser.parse_args(argv, namespace=Settings())
    args.command_line = shlex.join([parser.prog, *(sys.argv[1:] if argv is None else argv)])  # for the run report
    return args, parser


def settle(args: Settings, parser: argparse.ArgumentParser, cluster_gpus: int, resolve_model: bool = False) -> Settings:
    """Check every group, derive every setting (placement for a cluster of `cluster_gpus` GPUs included) and freeze.
    Inconsistent settings exit through `parser.error` with a sentence naming the flags. `resolve_model`: turn
    --hf-checkpoint into a local folder (provisioning a built-in model once)."""
    apply_custom_config(args, parser)
    validate_cluster(args, parser)
    settle_megatron(args, parser)
    validate_data(args, parser)
    settle_num_rollout(args, parser)
    validate_rollout(args, parser)
    validate_reward(args, parser)
    validate_checkpoints(args, parser)
    settle_eval(args, parser)
    settle_observe(args, parser)
    settle_algorithm(args, parser)
    settle_lora(args, parser)
    settle_batch_plan(args, parser)
    try:
        place(args, cluster_gpus)
    except PlacementError as exc:
        parser.error(str(exc))
    settle_engine_options(args)
    settle_router(args)
    if resolve_model:
        from slime.hub.provision import resolve_checkpoint

        try:
            args.hf_checkpoint = resolve_checkpoint(args.hf_checkpoint)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        try:  # dropout flags the model cannot honour fail here, not in every training rank
            from slime.trainer.models import dropout_overrides

            dropout_overrides(args.hf_checkpoint, args.attention_dropout, args.hidden_dropout)
        except ValueError as exc:
            parser.error(str(exc))
        why = check_tensor_parallel(args, args.hf_checkpoint)
        if why:
            parser.error(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: {why}")
        mismatches = check_architecture(args, args.hf_checkpoint)
        if mismatches:
            logging.getLogger("slime.config").warning(
                "Megatron model flags disagree with %s/config.json, which is what runs: %s",
                args.hf_checkpoint,
                "; ".join(mismatches),
            )
    args._settled = True
    return args


def parse_args(argv: list[str] | None = None, cluster_gpus: int = 0, resolve_model: bool = False) -> Settings:
    """Parse and settle in one call (`cluster_gpus`: GPUs of the Ray cluster the run will use)."""
    args, parser = parse_flags(argv)
    return settle(args, parser, cluster_gpus, resolve_model)
