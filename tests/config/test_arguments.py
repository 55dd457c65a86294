import pytest
import torch

from slime.config.arguments import parse_args

BASE = ["--hf-checkpoint", "m", "--prompt-data", "d.jsonl", "--rm-type", "math"]


def test_the_rollout_keeps_twice_the_engine_rows_in_flight_unless_told():
    # a row that frees is refilled from the engine's queue, not after a round trip through the rollout
    assert parse_args(BASE).sglang_server_concurrency == 2 * parse_args(BASE).sglang_max_running_requests
    a = parse_args([*BASE, "--sglang-max-running-requests", "48"])
    assert a.sglang_server_concurrency == 96
    assert parse_args([*BASE, "--sglang-server-concurrency", "512"]).sglang_server_concurrency == 512


def test_defaults_follow_slime():
    a = parse_args(BASE)
    assert a.input_key == "input" and a.metadata_key == "metadata" and a.rollout_seed == 42
    assert a.rollout_function_path == "slime.rollout.sglang_rollout.generate_rollout"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rollout-top-p", "0"], "rollout sampling flags: sampling_params.top_p"),
        (["--eval-prompt-data", "only_a_name"], "--eval-prompt-data takes pairs"),
        (["--n-samples-per-prompt", "0"], "--n-samples-per-prompt must be at least 1"),
        (["--apply-chat-template-kwargs", "[1]"], "expected a JSON object"),
        (["--use-kl-loss", "--kl-coef", "0.1"], "--use-kl-loss and --kl-coef both penalise"),
        (["--advantage-estimator", "dpo"], "invalid choice: 'dpo' (choose from 'grpo', 'gspo'"),
        (["--loss-type", "custom_loss"], "--loss-type custom_loss and --custom-loss-function-path go together"),
        (["--use-tis", "--use-rollout-logprobs"], "with --use-rollout-logprobs the two are the same"),
        (["--use-tis", "--tis-clip", "0.5", "--tis-clip-low", "0.5"], "--tis-clip-low 0.5 must be >= 0 and below"),
        (["--use-mis", "--mis-lower-bound", "0"], "--mis-lower-bound 0.0 must be > 0"),
        (["--advantage-estimator", "on_policy_distillation"], "needs a teacher: --opd-teacher-load PATH"),
        (["--use-opd", "--opd-type", "megatron"], "--opd-type megatron needs --opd-teacher-load"),
        (["--opd-teacher-load", "t"], "--opd-teacher-load without --use-opd"),
        (["--gamma", "0"], "--gamma must be in (0, 1]"),
        (["--rm-type", "remote_rm"], "--rm-type remote_rm needs --rm-url"),
        (["--rm-type", "boxed_f1"], "--rm-type: unknown rm_type 'boxed_f1'"),
        (["--rm-type", "maths"], "--rm-type: unknown rm_type 'maths'; built-in: ['dapo'"),
        (["--rm-timeout", "0"], "--rm-timeout must be positive"),
        (["--sglang-server-concurrency", "0"], "--sglang-server-concurrency must be at least 1, got 0"),
        (["--async", "--colocate"], "--async overlaps generation with training, but --colocate"),
        (["--async", "--offload-train"], "take turns on the GPU: drop them"),
        (["--async", "--max-staleness", "0"], "--max-staleness 0: with --update-weights-interval 1 and --async"),
        (["--max-staleness", "-1"], "--max-staleness -1: with --update-weights-interval 1 the engines"),
        (["--max-staleness", "1", "--update-weights-interval", "3"], "would be dropped: use at least 2"),
        (["--max-staleness", "2", "--keep-stale-samples"], "--keep-stale-samples needs --max-staleness and an off"),
        (["--async", "--debug-rollout-only"], "--debug-rollout-only/--debug-train-only run only one"),
        (["--rollout-backend", "vllm", "--update-weight-mode", "tensor"], "--update-weight-mode tensor is not wired"),
        (["--rollout-backend", "vllm", "--colocate"], "--rollout-backend vllm: --colocate needs engines that release"),
        (["--rollout-backend", "vllm", "--offload-rollout"], "--offload-rollout needs engines that release memory"),
        (["--rollout-backend", "trtllm"], "invalid choice: 'trtllm'"),
    ],
)
def test_bad_flags_are_refused_naming_them(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_the_vllm_backend_syncs_weights_from_disk():
    assert parse_args(BASE + ["--rollout-backend", "vllm"]).update_weight_mode == "disk"


def test_reward_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--hf-checkpoint", "m", "--prompt-data", "d.jsonl"])
    assert "--rm-type" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, gbs, steps",
    [
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"], 32, 1),
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--num-steps-per-rollout", "4"], 8, 4),
        (["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--global-batch-size", "16"], 16, 2),
        (
            [
                "--rollout-batch-size",
                "4",
                "--n-samples-per-prompt",
                "2",
                "--global-batch-size",
                "4",
                "--num-steps-per-rollout",
                "2",
            ],
            4,
            2,
        ),
    ],
)
def test_batch_plan_fills_in_the_missing_side(extra, gbs, steps):
    from slime.config.arguments import batch_plan

    a = parse_args(BASE + extra)
    assert (a.global_batch_size, a.num_steps_per_rollout) == (gbs, steps)
    assert f"{steps} optimizer step(s) of {gbs} samples" in batch_plan(a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--global-batch-size", "12"],
            "32 samples is not a multiple of --global-batch-size 12",
        ),
        (
            [
                "--rollout-batch-size",
                "8",
                "--n-samples-per-prompt",
                "4",
                "--global-batch-size",
                "8",
                "--num-steps-per-rollout",
                "2",
            ],
            "--global-batch-size 8 x --num-steps-per-rollout 2 = 16",
        ),
        (
            ["--rollout-batch-size", "3", "--n-samples-per-prompt", "2", "--num-steps-per-rollout", "4"],
            "do not split into --num-steps-per-rollout 4",
        ),
        (
            ["--rollout-batch-size", "3", "--n-samples-per-prompt", "1", "--actor-num-gpus-per-node", "2"],
            "does not split evenly over 2 data-parallel ranks",
        ),
        (
            ["--rollout-batch-size", "4", "--n-samples-per-prompt", "1", "--micro-batch-size", "3"],
            "not a multiple of --micro-batch-size 3",
        ),
        (["--advantage-estimator", "nope"], "argument --advantage-estimator: invalid choice: 'nope'"),
        (["--eps-clip-c", "0.5"], "--eps-clip-c must be greater than 1"),
    ],
)
def test_inconsistent_batch_settings_are_refused_naming_the_flags(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_dynamic_batch_size_without_a_budget_is_sized_by_the_trainer():
    from slime.config.arguments import batch_plan

    a = parse_args(BASE + ["--use-dynamic-batch-size"])
    assert a.max_tokens_per_gpu is None and "packed to <= a budget sized at the first step" in batch_plan(a)


def test_activation_estimate_scales_with_the_model_and_the_dtype():
    """The budget's per-token estimate: linear in layers, larger for float32, dominated by the head for big vocabs."""
    from types import SimpleNamespace

    from slime.trainer.budget import activation_bytes_per_token

    small = SimpleNamespace(
        hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=2, vocab_size=1000
    )
    deep = SimpleNamespace(**(vars(small) | {"num_hidden_layers": 4}))
    wide_vocab = SimpleNamespace(**(vars(small) | {"vocab_size": 100_000}))
    per = activation_bytes_per_token
    head = 2 * 2 * 1000
    assert per(deep, torch.bfloat16) - head - 8 * 64 == 2 * (per(small, torch.bfloat16) - head - 8 * 64)
    assert per(small, torch.float32) > per(small, torch.bfloat16)
    assert per(wide_vocab, torch.bfloat16) - per(small, torch.bfloat16) == 2 * 2 * 99_000


def test_algorithm_defaults_and_implications():
    a = parse_args(BASE + ["--advantage-estimator", "reinforce_plus_plus", "--lr", "3e-6"])
    assert a.normalize_advantages  # REINFORCE++ is defined with batch whitening
    assert a.critic_lr == 3e-6 and a.eps_clip_high == a.eps_clip == 0.2 and a.loss_type == "policy_loss"
    b = parse_args(BASE + ["--use-opd", "--opd-teacher-load", "teacher"])
    assert b.opd_type == "model"


def test_settled_args_are_read_only_and_survive_pickling():
    import pickle

    a = parse_args(BASE)
    ours = {"__name__": "slime.rollout.somewhere", "args": a}  # code of this package
    with pytest.raises(AttributeError, match="args.lr assigned in slime.rollout.somewhere: .* read-only"):
        exec("args.lr = 1.0", ours)
    with pytest.raises(AttributeError, match="read-only once settled"):
        exec("del args.lr", ours)
    with pytest.raises(AttributeError, match="read-only once settled"):
        exec("setattr(args, 'seed', 1)", ours)
    b = pickle.loads(pickle.dumps(a))  # as every Ray actor receives it
    assert vars(b) == vars(a)
    with pytest.raises(AttributeError):
        exec("args.seed = 1", {"__name__": "slime.x", "args": b})
    c = a.replace(lr=0.5)
    assert c.lr == 0.5 and a.lr == 1e-6
    c.rollout_max_context_len = 64  # a user's hook may, as slime's multi-agent example does: this copy only
    assert c.rollout_max_context_len == 64 and a.rollout_max_context_len is None


def test_help_lists_the_registered_names(capsys):
    """--help is built from the registries: a new estimator, KL estimator or reward type shows without an edit."""
    from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from slime.algorithms.losses import KL_ESTIMATORS
    from slime.rollout.rm_hub import BUILTIN_RM

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*ADVANTAGE_ESTIMATORS, *KL_ESTIMATORS, *BUILTIN_RM, "--sglang-mem-fraction-static"]:
        assert name in text


def test_no_module_assigns_to_args_outside_the_settle_step():
    """The configuration is derived in slime/config only; everywhere else it is read (the frozen object enforces it
    at run time, this finds it in code no test runs)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*(root / "slime").rglob("*.py"), *(root / "examples").rglob("*.py"), root / "train.py"]:
        if "config" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            targets = list(targets)
            while targets:  # args.x = ..., args.x[k] = ..., (a, args.x) = ... (not d[args.x] = ...)
                t = targets.pop()
                if isinstance(t, ast.Tuple | ast.List):
                    targets += t.elts
                elif isinstance(t, ast.Starred | ast.Subscript):
                    targets.append(t.value)
                elif isinstance(t, ast.Attribute):
                    if isinstance(t.value, ast.Name) and t.value.id == "args":
                        offenders.append(f"{path.relative_to(root)}:{node.lineno} args.{t.attr}")
                    else:
                        targets.append(t.value)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                if isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} setattr(args, ...)")
    assert offenders == []


def test_context_length_start_id_interval_and_warmup_fraction(capsys):
    a = parse_args(BASE + ["--rollout-max-context-len", "512", "--num-rollout", "10", "--lr-warmup-fraction", "0.25"])
    assert a.rollout_max_prompt_len == 511 and a.eval_max_context_len == 512  # slime's defaults
    assert a.lr_warmup_iters == 2  # a quarter of 10 rollouts x 1 optimizer step, rounded down
    for extra, message in [
        (["--rollout-max-context-len", "100", "--rollout-max-prompt-len", "100"], "must be at most 99"),
        (["--start-rollout-id", "3"], "--start-rollout-id 3 must be in [0, --num-rollout 1)"),
        (["--update-weights-interval", "2", "--colocate"], "sync every rollout"),
        (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "choose one"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(BASE + extra)
        assert message in capsys.readouterr().err


def test_eval_keys_default_to_the_rollout_keys(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"q": "1+1", "a": "2"}\n')
    a = parse_args(BASE + ["--input-key", "prompt", "--label-key", "label", "--eval-prompt-data", "e", str(path)])
    assert (a.eval_datasets[0].input_key, a.eval_datasets[0].label_key) == ("prompt", "label")
    b = parse_args(
        BASE
        + ["--input-key", "prompt", "--eval-input-key", "q", "--eval-label-key", "a", "--eval-min-new-tokens", "3"]
        + ["--eval-max-prompt-len", "64", "--eval-prompt-data", "e", str(path)]
    )
    cfg = b.eval_datasets[0]
    assert (cfg.input_key, cfg.label_key, cfg.min_new_tokens, cfg.max_prompt_len) == ("q", "a", 3, 64)
