"""One training rank: an FSDP2-sharded Hugging Face policy (plus a frozen reference, a distillation teacher and a
critic when the algorithm needs them), AdamW, and the RL step.

Every rank receives the whole rollout (it is small next to the model). Each computes the per-token inputs (old,
reference and teacher log-probs, values) for its own share, and one gather gives every rank all of them, so
advantages, whitening and loss normalisers are computed over the global batch identically everywhere. All
ranks run the same number of forward/backward passes (a rank with less data runs zero-weight padding passes),
because every FSDP pass is a collective.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from slime.algorithms.corrections import importance_weights, mismatch_metrics
from slime.algorithms.losses import KL_ESTIMATORS
from slime.sync.syncer import WeightSyncer
from slime.sync.transport import host_store, join_store
from slime.trainer import checkpoint
from slime.trainer.budget import token_budget
from slime.trainer.lora import adapters_disabled, check_spec, lora_spec, write_spec
from slime.trainer.loss import MicroBatch, critic_loss, micro_batch_loss, takes_pg_loss
from slime.trainer.models import (
    compile_pointwise,
    compute_dtype,
    copy_weights,
    dropout_overrides,
    load_critic,
    load_policy,
    total_norm,
)
from slime.trainer.offload import HostOffload, resident_tensors
from slime.trainer.optimizer import build_optimizer
from slime.trainer.packing import (
    forward_log_probs,
    forward_values,
    rank_shares,
    split_micro_batches,
    trajectory_steps,
)
from slime.utils.misc import load_function
from slime.utils.types import TokenColumns, TrainBatch

logger = logging.getLogger(__name__)
PAD_PASS = ([0, 0], 1)  # tokens and response length of a padding pass: one predicted token, weight 0
Tokens = list[torch.Tensor]


class TrainActor:
    """Ray actor (wrapped with ray.remote by slime.ray.train_group). Rank `rank` of `world_size`."""

    def __init__(self, args: Any, rank: int, world_size: int):
        """Cheap: the rank can report its GPU at once; `setup` joins the group and loads the models."""
        self.args, self.rank, self.world_size = args, rank, world_size
        self.store: dist.Store | None = None
        logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def gpus(self) -> list[tuple[str, str]]:
        """This rank's GPUs as (Ray node id, physical GPU id) (engines sharing them run on that node with the id
        as CUDA_VISIBLE_DEVICES); [] on CPU."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        return [(node, str(i)) for i in ray.get_gpu_ids()]

    def host_store(self) -> tuple[str, int]:
        """Rank 0 only, before any rank's `setup`: host the group's rendezvous store; returns its (address, port)."""
        import ray

        address = ray.util.get_node_ip_address()  # reachable from ranks on other nodes, not only loopback
        timeout_s = self.args.distributed_timeout_minutes * 60
        self.store = host_store(address, self.world_size, timeout_s)
        return address, self.store.port

    def setup(self, master: tuple[str, int]) -> None:
        """Join the training group through rank 0's store at `master`, then load the models."""
        args, use_cuda = self.args, self.device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(0)  # Ray exposes this rank's GPU as device 0
        else:
            torch.set_num_threads(args.train_threads or max(1, (os.cpu_count() or 1) // self.world_size))
        if self.store is None:
            self.store = join_store(*master, self.world_size, args.distributed_timeout_minutes * 60)
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if use_cuda else "gloo",  # metrics and object gathers are CPU tensors
            store=self.store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        )
        from torch.distributed.device_mesh import init_device_mesh

        self.tp = args.tensor_model_parallel_size  # ranks r // tp form data-parallel rank r // tp's TP group
        self.dp = self.world_size // self.tp
        if self.tp > 1:
            mesh = init_device_mesh(self.device.type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
        else:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
        torch.manual_seed(args.seed)
        dropout = dropout_overrides(args.hf_checkpoint, args.attention_dropout, args.hidden_dropout)
        self.dtype = compute_dtype(self.device, args.train_compute_dtype)
        self.lora = lora_spec(args)  # None: every weight trains
        self.model = load_policy(
            args.hf_checkpoint, self.device, mesh, True, args.activation_checkpointing, dropout, self.dtype, self.lora
        )
        self.model.train()
        self.optimizer, self.scheduler = build_optimizer(self.model, args, args.lr)
        needs_ref = args.use_kl_loss or args.kl_coef != 0
        # LoRA without --ref-load: the reference is the policy with its adapters switched off, not a second copy
        self.ref_is_base = needs_ref and self.lora is not None and not args.ref_load
        self.ref_model = self._load_reference(mesh) if needs_ref and not self.ref_is_base else None
        teacher = args.opd_teacher_load
        self.teacher = load_policy(teacher, self.device, mesh, False, dtype=self.dtype) if teacher else None
        # --keep-old-actor: the weights the engines serve (copied at every weight sync), for the old log-probs
        keep = args.keep_old_actor
        self.old_actor = (
            load_policy(args.hf_checkpoint, self.device, mesh, False, dtype=self.dtype, lora=self.lora)
            if keep
            else None
        )
        self.critic = None
        if ADVANTAGE_ESTIMATORS[args.advantage_estimator].needs_critic:
            self.critic = load_critic(args.critic_load or args.hf_checkpoint, self.device, mesh, self.dtype)
            self.critic_optimizer, self.critic_scheduler = build_optimizer(self.critic, args, args.critic_lr)
        if args.train_compile == "on" or (args.train_compile == "auto" and use_cuda):
            for m in (self.model, self.ref_model, self.teacher, self.old_actor, self.critic):
                if m is not None:
                    compile_pointwise(m)
        self.hooks = {
            name: load_function(path, flag) if path else None
            for name, path, flag in [
                ("custom_loss_fn", args.custom_loss_function_path, "--custom-loss-function-path"),
                ("pg_reducer", args.custom_pg_loss_reducer_function_path, "--custom-pg-loss-reducer-function-path"),
                ("tis", args.custom_tis_function_path, "--custom-tis-function-path"),
                ("advantage", args.custom_advantage_function_path, "--custom-advantage-function-path"),
                ("postprocess", args.rollout_data_postprocess_path, "--rollout-data-postprocess-path"),
            ]
        }
        self.syncer: WeightSyncer | None = None
        self._rollout_extras: dict[str, Tokens] = {}  # per-token columns only hooks and metrics read
        self.step = 0
        self.host = HostOffload()  # --offload-train's pinned host copies
        self.budget: int | None = None  # tokens per packed micro-batch (--max-tokens-per-gpu, or sized at first use)
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient norm, over the whole run
        self.trained_through: int | None = None  # the last rollout this process trained on

    def _load_reference(self, mesh) -> torch.nn.Module:
        """The frozen reference: a Hugging Face folder, or the policy weights of a slime checkpoint (--ref-load)."""
        path = self.args.ref_load or self.args.hf_checkpoint
        if not checkpoint.is_checkpoint(path):
            return load_policy(path, self.device, mesh, False, dtype=self.dtype)
        model = load_policy(self.args.hf_checkpoint, self.device, mesh, False, dtype=self.dtype)
        checkpoint.load_model(model, None, checkpoint.latest(path)[1] / "policy")
        return model

    # ------------------------------------------------------------------ helpers
    def _passes(self, indices_per_rank: list[list[int]], lengths: list[int], no_grad: bool = False) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices), padded with [] up to the largest count of any rank.
        Passes without gradient pack to `--log-probs-max-tokens-per-gpu` when it is set."""
        a = self.args
        max_tokens = None
        if a.use_dynamic_batch_size:
            if self.budget is None:
                self.budget = a.max_tokens_per_gpu or token_budget(self.model, self.optimizer, self.dtype)
            max_tokens = self.budget if (a.max_tokens_per_gpu or not no_grad) else 2 * self.budget
        if no_grad and a.log_probs_max_tokens_per_gpu:
            max_tokens = a.log_probs_max_tokens_per_gpu
        plans = [
            [
                [idx[j] for j in mb]
                for mb in split_micro_batches([lengths[i] for i in idx], a.micro_batch_size, max_tokens)
            ]
            for idx in indices_per_rank
        ]
        most = max(len(p) for p in plans)
        mine = plans[self.rank]
        return mine + [[] for _ in range(most - len(mine))]

    @staticmethod
    def _inputs(data: TrainBatch, mb: list[int]) -> tuple[list[list[int]], list[int]]:
        if not mb:
            return [PAD_PASS[0]], [PAD_PASS[1]]
        return [data.tokens[i] for i in mb], [data.response_lengths[i] for i in mb]

    @torch.no_grad()
    def _per_sample(
        self, model, data: TrainBatch, indices_per_rank: list[list[int]], values: bool = False, key: str = "log_probs"
    ) -> dict:
        """{sample index: [r_i] log-probs (or `key` of forward_log_probs, or the critic's values)} for this rank's
        share, no gradient."""
        lengths = [len(t) for t in data.tokens]
        out = {}
        for mb in self._passes(indices_per_rank, lengths, no_grad=True):
            tokens, rlens = self._inputs(data, mb)
            if values:
                result = forward_values(model, tokens, rlens)
            else:
                temperature = self.args.rollout_temperature
                result = forward_log_probs(model, tokens, rlens, temperature, entropy=key == "entropy")[key]
            for i, chunk in zip(mb, result.split(rlens) if mb else [], strict=True):
                out[i] = chunk.cpu()
        # FSDP2 leaves the root's parameters gathered (in the compute dtype) after a forward without backward:
        # shard them again, so later reads and copies (sync, checkpoints, copy_weights) see the float32 shards
        model.reshard()
        return out

    def _gather(self, mine: dict[str, dict[int, torch.Tensor]], n: int) -> dict[str, Tokens]:
        """Every rank's share of each column, merged into lists over all n samples on every rank."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        return {name: [next(p[name][i] for p in parts if i in p[name]) for i in range(n)] for name in mine}

    def _token_columns(self, data: TrainBatch, indices_per_rank: list[list[int]]) -> TokenColumns:
        """The per-token inputs of the estimators and losses over all samples (see advantages.py)."""
        a, n = self.args, len(data)
        rollout = data.rollout_log_probs or [[] for _ in range(n)]
        has_rollout = all(len(r) == k for r, k in zip(rollout, data.response_lengths, strict=True))
        if a.use_rollout_logprobs and not has_rollout:
            missing = [i for i, k in enumerate(data.response_lengths) if len(rollout[i]) != k]
            raise ValueError(
                f"--use-rollout-logprobs: {len(missing)} samples (first: #{missing[0]}) have no engine log-prob "
                "per response token; return them from the generate function or drop the flag"
            )
        mine: dict[str, dict[int, torch.Tensor]] = {}
        behaviour = self.old_actor if self.old_actor is not None else self.model
        if a.use_rollout_logprobs:
            mine["old_log_probs"] = {i: torch.tensor(rollout[i]) for i in indices_per_rank[self.rank]}
            if a.get_mismatch_metrics and has_rollout:  # the trainer's own view, for the mismatch metrics only
                mine["train_log_probs"] = self._per_sample(behaviour, data, indices_per_rank)
        else:
            mine["old_log_probs"] = self._per_sample(behaviour, data, indices_per_rank)
        if a.use_rollout_entropy:
            mine["entropy"] = self._per_sample(behaviour, data, indices_per_rank, key="entropy")
        for name, model in (("ref_log_probs", self.ref_model), ("teacher_log_probs", self.teacher)):
            if model is not None:
                mine[name] = self._per_sample(model, data, indices_per_rank)
        if self.ref_is_base:
            with adapters_disabled(self.model):
                mine["ref_log_probs"] = self._per_sample(self.model, data, indices_per_rank)
        if self.critic is not None:
            mine["values"] = self._per_sample(self.critic, data, indices_per_rank, values=True)
        gathered = self._gather(mine, n)
        self._rollout_extras = {k: gathered.pop(k) for k in ("train_log_probs", "entropy") if k in gathered}
        cols = TokenColumns(
            group_sizes=data.group_sizes or None,
            loss_masks=[torch.tensor(m, dtype=torch.float32) for m in data.loss_masks],
            rollout_log_probs=[torch.tensor(r) for r in rollout] if has_rollout else None,
            **gathered,
        )
        if a.use_opd and a.opd_type == "sglang":
            cols.teacher_log_probs = self._teacher_from_samples(data)
        if a.kl_coef and cols.ref_log_probs is not None:
            kl = KL_ESTIMATORS[a.kl_loss_type]
            cols.kl = [kl(o, r) for o, r in zip(cols.old_log_probs, cols.ref_log_probs, strict=True)]
        else:
            cols.kl = [torch.zeros_like(m) for m in cols.loss_masks]
        return cols

    def _rollout_data_hook(self, kind: str, data: TrainBatch, cols: TokenColumns, fn) -> tuple[Tokens, Tokens | None]:
        """Call a slime-style hook on the rollout as a dict of per-sample lists ([r_i] tensors per token column):
        --custom-advantage-function-path must set 'advantages' (and 'returns' for a critic);
        --rollout-data-postprocess-path may change 'loss_masks', 'advantages' and 'returns'. Returns the
        advantages and returns after the call; changed loss masks are written back into `cols`."""
        flag = "--custom-advantage-function-path" if kind == "advantage" else "--rollout-data-postprocess-path"
        n = len(data)
        rollout_data = {
            "tokens": data.tokens,
            "response_lengths": data.response_lengths,
            "total_lengths": [len(t) for t in data.tokens],
            "rewards": list(data.rewards),
            "loss_masks": cols.loss_masks,
            "log_probs": cols.old_log_probs,
            "ref_log_probs": cols.ref_log_probs,
            "rollout_log_probs": cols.rollout_log_probs,
            "teacher_log_probs": cols.teacher_log_probs,
            "values": cols.values,
            "kl": cols.kl,
            **self._rollout_extras,  # the behaviour policy's entropy under --use-rollout-entropy
        }
        if kind == "postprocess":
            rollout_data |= {"advantages": cols.advantages, "returns": cols.returns}
        fn(self.args, rollout_data)

        def per_token(key: str, required: bool) -> Tokens | None:
            value = rollout_data.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, list | tuple) or len(value) != n:
                got = f"{len(value)} entries" if isinstance(value, list | tuple) else type(value).__name__
                raise ValueError(f"{flag}: rollout_data[{key!r}] must be a list of {n} per-sample tensors, got {got}")
            out = [torch.as_tensor(v, dtype=torch.float32) for v in value]
            bad = [i for i, (v, r) in enumerate(zip(out, data.response_lengths, strict=True)) if v.shape != (r,)]
            if bad:
                i = bad[0]
                raise ValueError(
                    f"{flag}: rollout_data[{key!r}][{i}] has shape {tuple(out[i].shape)}, the response has "
                    f"{data.response_lengths[i]} tokens"
                )
            return out

        cols.loss_masks = per_token("loss_masks", True)
        advantages = per_token("advantages", cols.old_log_probs is not None)
        returns = per_token("returns", self.critic is not None)
        return advantages, returns

    @staticmethod
    def _teacher_from_samples(data: TrainBatch) -> Tokens:
        teacher, lengths = data.teacher_log_probs or [], data.response_lengths
        bad = [i for i, k in enumerate(lengths) if i >= len(teacher) or len(teacher[i] or []) != k]
        if bad:
            raise ValueError(
                f"--opd-type sglang: {len(bad)} samples (first: #{bad[0]}) carry no Sample.teacher_log_probs with one "
                "value per response token; set them in the reward or generate function (or use --opd-teacher-load)"
            )
        return [torch.tensor(t, dtype=torch.float32) for t in teacher]

    def _corrections(self, cols: TokenColumns) -> tuple[Tokens | None, Tokens | None, dict[str, Tokens]]:
        a = self.args
        if not (a.use_tis or a.use_mis or self.hooks["tis"]):
            if a.get_mismatch_metrics and cols.rollout_log_probs is not None:  # measured, nothing corrected
                train = self._rollout_extras.get("train_log_probs", cols.old_log_probs)
                return None, None, mismatch_metrics(train, cols.rollout_log_probs)
            return None, None, {}
        if cols.rollout_log_probs is None:
            raise ValueError(
                "--use-tis/--use-mis/--custom-tis-function-path need the engine's log-prob of every response token "
                "(Sample.rollout_log_probs); the rollout returned samples without them"
            )
        if self.hooks["tis"] is not None and takes_pg_loss(self.hooks["tis"]):
            return None, None, {}  # slime's signature: applied inside the loss, per micro-batch
        fn = self.hooks["tis"] or importance_weights
        return fn(
            a, train_log_probs=cols.old_log_probs, rollout_log_probs=cols.rollout_log_probs, loss_masks=cols.loss_masks
        )

    # ------------------------------------------------------------------ public
    def _per_rank(self, dp_shares: list[list[int]]) -> list[list[int]]:
        """Data-parallel shares -> one per rank: the ranks of a tensor-parallel group process the same samples."""
        return [dp_shares[r // self.tp] for r in range(self.world_size)]

    def log_probs(self, data: TrainBatch) -> list[list[float]]:
        """Current policy's log-probs of every sample's response tokens (all ranks must call; every rank gets all)."""
        n = len(data)
        shares = self._per_rank([list(range(r, n, self.dp)) for r in range(self.dp)])
        merged = self._gather({"lp": self._per_sample(self.model, data, shares)}, n)["lp"]
        return [t.tolist() for t in merged]

    def train(self, rollout_id: int, data: TrainBatch) -> dict[str, float]:
        """All optimizer steps of one rollout. Returns metrics averaged over the steps."""
        a, start, world = self.args, time.monotonic(), self.world_size
        g = a.global_batch_size
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        critic_only = rollout_id < a.num_critic_only_steps  # --num-critic-only-steps: the policy waits
        steps, denominators = trajectory_steps(data, g)
        lengths = [len(t) for t in data.tokens]
        shares = [self._per_rank(rank_shares(step, lengths, self.dp, a.balance_data)) for step in steps]
        everything = [[i for step in shares for i in step[r]] for r in range(world)]
        rank_tokens = [[sum(lengths[i] for i in share) for share in step] for step in shares]
        if a.compute_advantages_and_returns:
            cols = self._token_columns(data, everything)
            if self.hooks["advantage"] is not None:
                cols.advantages, cols.returns = self._rollout_data_hook(
                    "advantage", data, cols, self.hooks["advantage"]
                )
            else:
                cols.advantages, cols.returns = compute_advantages(torch.tensor(data.rewards), cols, a)
            cols.is_weights, cols.is_masks, is_metrics = self._corrections(cols)
        else:  # a supervised (or custom) loss: no behaviour-policy pass, no estimator
            cols = TokenColumns([torch.tensor(m, dtype=torch.float32) for m in data.loss_masks], old_log_probs=None)
            is_metrics = {}
        if self.hooks["postprocess"] is not None:
            hook = self.hooks["postprocess"]
            cols.advantages, cols.returns = self._rollout_data_hook(
                "postprocess", data, cols, lambda args, d: hook(args, rollout_id, d)
            )
            _, denominators = trajectory_steps(data, g, cols.loss_masks)  # the hook may have changed the masks
        totals: dict[str, float] = {}
        tokens, skipped_before = 0, self.skipped_steps
        for step, step_shares in zip(steps, shares, strict=True):
            if a.calculate_per_token_loss:
                normalizer = max(1.0, float(sum(float(cols.loss_masks[i].sum()) for i in step)))
            else:  # trajectories in the step (samples, unless a trajectory came back as several)
                normalizer = float(g)
            sums: dict[str, float] = {}
            for mb in self._passes(step_shares, lengths):
                batch = self._micro_batch(data, mb, cols, is_metrics, normalizer)
                if denominators is not None and mb:
                    batch.denominators = [denominators[i] for i in mb]
                tokens += sum(lengths[i] for i in mb)
                inputs = self._inputs(data, mb)
                out = forward_log_probs(
                    self.model,
                    *inputs,
                    a.rollout_temperature,
                    entropy_grad=a.entropy_coef != 0,
                    keep_logits=a.loss_type == "custom_loss",
                )
                loss, shares_ = micro_batch_loss(a, batch, out)
                if not critic_only:
                    (loss * self.dp).backward()  # FSDP averages over dp ranks; the loss is a share of a global sum
                if self.critic is not None:
                    closs, cshares = critic_loss(a, batch, forward_values(self.critic, *inputs))
                    (closs * self.dp).backward()
                    shares_ |= {f"critic/{k}": v for k, v in cshares.items()}
                for k, v in shares_.items():
                    sums[k] = sums.get(k, 0.0) + v
            sums = self._sum_over_ranks(sums)
            if not critic_only:
                sums["grad_norm"] = self._clip_and_step(self.model, self.optimizer, self.scheduler, rollout_id)
            if self.critic is not None:
                sums["critic/grad_norm"] = self._clip_and_step(
                    self.critic, self.critic_optimizer, self.critic_scheduler, rollout_id
                )
            self.step += 1
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v / len(steps)
        if a.ref_update_interval and self.ref_model is not None and (rollout_id + 1) % a.ref_update_interval == 0:
            copy_weights(self.model, self.ref_model)  # --ref-update-interval: the KL anchor moves to the policy
        seconds = time.monotonic() - start
        out = {(k if "/" in k else f"train/{k}"): v for k, v in totals.items()}
        out |= self._advantage_stats(cols)
        out |= self._state_size()
        if self.device.type == "cuda":  # weights, gradients, optimizer state and activations at their highest
            out["perf/train_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out.update(
            {
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/seconds": seconds,
                "train/param_norm": self._param_norm(),
                "train/tokens_per_s": self._sum_over_ranks({"t": tokens})["t"] / seconds,
                "train/optimizer_steps": self.step,
                "perf/token_budget": float(self.budget or 0),
                "train/skipped_steps": self.skipped_steps - skipped_before,
                "train/skipped_steps_total": self.skipped_steps,
                "perf/rank_tokens_max_over_min": max(max(t) / max(min(t), 1) for t in rank_tokens),
            }
        )
        if a.offload_train and self.device.type == "cuda":  # overlaps the weight sync; offload() finishes it
            self.host.begin_offload(self._optimizer_state())
        self.trained_through = rollout_id
        return out

    def _sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Sum over data-parallel ranks (the ranks of a tensor-parallel group hold the same values: counted once)."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, values)
        keys = sorted({k for p in parts for k in p})
        return {k: sum(p.get(k, 0.0) for p in parts) / self.tp for k in keys}

    @staticmethod
    def _advantage_stats(cols: TokenColumns) -> dict[str, float]:
        if cols.advantages is None:
            return {}
        mask = torch.cat(cols.loss_masks).bool()
        adv = torch.cat(cols.advantages)[mask].double()
        if not adv.numel():
            return {}
        return {
            "train/advantage_mean": float(adv.mean()),
            "train/advantage_std": float(adv.std(unbiased=False)),
            "train/advantage_abs_max": float(adv.abs().max()),
        }

    def _micro_batch(
        self, data: TrainBatch, mb: list[int], cols: TokenColumns, is_metrics: dict, normalizer: float
    ) -> MicroBatch:
        """One micro-batch's per-token tensors [R]; a padding pass gets one token of weight 0."""

        def take(col: Tokens | None) -> torch.Tensor | None:
            if col is None:
                return None
            parts = [col[i] for i in mb] if mb else [torch.zeros(1)]
            return torch.cat(parts).to(device=self.device, dtype=torch.float32)

        lengths = [data.response_lengths[i] for i in mb] if mb else [PAD_PASS[1]]
        batch = MicroBatch(
            mask=take(cols.loss_masks) if mb else torch.zeros(1, device=self.device),
            lengths=lengths,
            normalizer=normalizer,
            advantages=take(cols.advantages),
            old_log_probs=take(cols.old_log_probs),
            ref_log_probs=take(cols.ref_log_probs),
            rollout_log_probs=take(cols.rollout_log_probs),
            is_weights=take(cols.is_weights),
            is_masks=take(cols.is_masks),
            returns=take(cols.returns),
            old_values=take(cols.values),
            is_metrics={k: take(v) for k, v in is_metrics.items()},
            custom_loss_fn=self.hooks["custom_loss_fn"],
            tis_hook=self.hooks["tis"] if self.hooks["tis"] and takes_pg_loss(self.hooks["tis"]) else None,
            total_lengths=[len(data.tokens[i]) for i in mb] if mb else [len(PAD_PASS[0])],
        )
        if self.hooks["pg_reducer"] is not None:
            keep = batch.is_masks if batch.is_masks is not None else batch.mask
            batch.pg_reducer = self._pg_reducer(data, mb, lengths, list((keep * batch.mask).split(lengths)))
        return batch

    def _pg_reducer(self, data: TrainBatch, mb: list[int], lengths: list[int], masks: Tokens):
        factory = self.hooks["pg_reducer"]
        total = [len(data.tokens[i]) for i in mb] if mb else [len(PAD_PASS[0])]
        kwargs = {"args": self.args} if "args" in inspect.signature(factory).parameters else {}
        return factory(total, lengths, masks, self.args.calculate_per_token_loss, **kwargs)

    def _clip_and_step(self, model, optimizer, scheduler, rollout_id: int) -> float:
        """Clip and apply the gradients. A non-finite global norm (NaN/Inf in the loss or a gradient; every rank
        sees the same norm) skips the update, scheduler included, and is counted; past --max-nan-steps the run
        stops."""
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.args.clip_grad if self.args.clip_grad > 0 else float("inf")
        self.host.ready()  # an onload's optimizer state may still be on its way
        norm = total_norm([p.grad for p in params])  # each shard once, over FSDP and tensor-parallel meshes alike
        if math.isfinite(norm) and norm > max_norm:
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(max_norm / (norm + 1e-6))  # a float: the same on every shard and mesh
        if math.isfinite(norm):
            optimizer.step()
            scheduler.step()
        else:
            self.skipped_steps += 1
            logger.warning(
                "rank %d, rollout %d, optimizer step %d: gradient norm is %s; update skipped (%d so far)",
                self.rank,
                rollout_id,
                self.step,
                norm,
                self.skipped_steps,
            )
            if self.skipped_steps > self.args.max_nan_steps:
                raise FloatingPointError(
                    f"rank {self.rank}, rollout {rollout_id}, optimizer step {self.step}: {self.skipped_steps} "
                    f"updates had a non-finite loss or gradient, more than --max-nan-steps {self.args.max_nan_steps}"
                )
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _state_size(self) -> dict[str, float]:
        """The policy's parameters that train, and the bytes of its training state over all ranks: fp32 weights,
        plus gradient and two AdamW moments (fp32) of each trained parameter."""
        params = list(self.model.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        return {
            "train/trainable_parameters": trained,
            "perf/train_state_bytes": 4 * sum(p.numel() for p in params) + 12 * trained,
        }

    @torch.no_grad()
    def _param_norm(self) -> float:
        return total_norm([p.detach() for p in self.model.parameters()])

    def _new_syncer(self, engine_urls: list[str], folder: str) -> WeightSyncer:
        a = self.args
        disk_dir = os.path.join(os.path.abspath(a.output_dir), folder)  # disk mode writes here
        return WeightSyncer(
            engine_urls,
            a.update_weight_mode,
            a.update_weight_buffer_size,
            a.update_weight_timeout,
            disk_dir,
            dtype=a.rollout_engine_dtype,
            pause_mode=a.weight_sync_pause_mode,
            adapters_only=self.lora is not None and a.lora_sync == "adapters",
        )

    def connect_engines(self, engine_urls: list[str]) -> None:
        if self.syncer is not None:  # the engine set changed (a restart): the next sync forms a new group
            self.syncer.close()
        self.syncer = self._new_syncer(engine_urls, "weight_sync")

    def update_weights(self, version: str) -> dict[str, float]:
        if self.syncer is None:
            raise RuntimeError("update_weights before connect_engines: the trainer does not know the engines")
        out = self.syncer.sync(self.model, version, self.rank)
        if self.old_actor is not None:  # the engines now serve these weights
            copy_weights(self.model, self.old_actor)
        dist.barrier()
        return out

    def offload(self) -> dict[str, float]:
        """--offload-train: every model's weights and the optimizer state go to pinned host memory, so the rollout
        has the GPU (slime.trainer.offload)."""
        return self._move("offload")

    def onload(self) -> dict[str, float]:
        """Back from pinned host memory: the weights before returning, the optimizer state while the first passes
        run (the optimizer step waits for it)."""
        return self._move("onload")

    def _optimizer_state(self) -> list[torch.Tensor]:
        return resident_tensors([], [opt for _, _, opt, _ in self._trained()])

    def _move(self, what: str) -> dict[str, float]:
        if self.device.type != "cuda":  # nothing to free on a CPU rank
            return {}
        start, before = time.monotonic(), torch.cuda.memory_allocated()
        if what == "offload":
            models = [
                m for m in (self.model, self.ref_model, self.teacher, self.critic, self.old_actor) if m is not None
            ]
            moved = self.host.offload(resident_tensors(models, []), late=self._optimizer_state())
            if self.syncer is not None:
                self.syncer.release_buffers()
            torch.cuda.empty_cache()  # back to the driver: the engine is another process
        else:
            moved = self.host.onload()
        after, seconds = torch.cuda.memory_allocated(), time.monotonic() - start
        logger.info(
            "rank %d %s: %.2f GB in %.3f s, GPU allocated %.2f -> %.2f GB",
            self.rank,
            what,
            moved / 1e9,
            seconds,
            before / 1e9,
            after / 1e9,
        )
        return {
            f"perf/{what}_gpu_gb_before": before / 1e9,
            f"perf/{what}_gpu_gb_after": after / 1e9,
            f"perf/{what}_seconds": seconds,
            f"perf/{what}_gb_per_s": moved / 1e9 / max(seconds, 1e-9),
        }

    def push_weights(self, engine_urls: list[str], version: str) -> dict[str, float]:
        """Sync the current weights to some engines only (a restarted one), leaving the others' requests alone.
        They are labelled with the version they are: `version` (the last sync's) unless this process has trained
        since (with --async a restart during a rollout can land after the step that overlaps it)."""
        if self.trained_through is not None:
            version = str(self.trained_through + 1)
        syncer = self._new_syncer(engine_urls, "weight_sync_recovery")
        try:
            out = syncer.sync(self.model, version, self.rank)
        finally:
            syncer.close()
        dist.barrier()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _trained(self) -> list[tuple[str, torch.nn.Module, torch.optim.Optimizer, Any]]:
        parts = [("policy", self.model, self.optimizer, self.scheduler)]
        if self.critic is not None:
            parts.append(("critic", self.critic, self.critic_optimizer, self.critic_scheduler))
        return parts

    def _copied(self) -> list[tuple[str, torch.nn.Module]]:
        """Frozen models whose weights the run changes by copying the policy's, so checkpoints keep them too."""
        parts = []
        if self.ref_model is not None and self.args.ref_update_interval:
            parts.append(("reference", self.ref_model))
        if self.old_actor is not None:
            parts.append(("old_actor", self.old_actor))
        return parts

    def save(self, folder: str) -> None:
        """Write this rank's part of a checkpoint into the staging `folder` (every rank calls; see checkpoint.py)."""
        folder_ = Path(folder)
        self.host.ready()
        if self.lora is not None and self.rank == 0:
            write_spec(folder_, self.lora, self.args.hf_checkpoint)
        for name, model, optimizer, _ in self._trained():
            checkpoint.save_model(model, None if self.args.no_save_optim else optimizer, folder_ / name)
        for name, model in self._copied():
            checkpoint.save_model(model, None, folder_ / name)
        (folder_ / "rng").mkdir(exist_ok=True)
        torch.save(checkpoint.rng_state(), folder_ / "rng" / f"rank_{self.rank}.pt")
        if self.rank == 0:
            from transformers import AutoTokenizer

            state = {
                "step": self.step,
                "skipped_steps": self.skipped_steps,
                "world_size": self.world_size,
                "schedulers": {name: sch.state_dict() for name, _, _, sch in self._trained()},
            }
            torch.save(state, folder_ / "trainer.pt")
            self.model.config.save_pretrained(folder_ / "hf_config")
            AutoTokenizer.from_pretrained(self.args.hf_checkpoint).save_pretrained(folder_ / "hf_config")
        dist.barrier()

    def load(self, folder: str) -> dict[str, Any]:
        """Restore weights, optimizer, schedulers, counters and RNG from a checkpoint written by any world size."""
        folder_, a = Path(folder), self.args
        self.host.ready()
        check_spec(folder_, self.lora)
        state = torch.load(folder_ / "trainer.pt", weights_only=False)
        loaded_optim = True
        for name, model, optimizer, scheduler in self._trained():
            if not (folder_ / name).exists():
                raise FileNotFoundError(f"{folder_ / name} is missing: the checkpoint was saved without the {name}")
            loaded_optim &= checkpoint.load_model(model, None if a.no_load_optim else optimizer, folder_ / name)
            scheduler.load_state_dict(state["schedulers"][name])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr  # also right when the optimizer starts fresh (--no-save-optim / --no-load-optim)
        for name, model in self._copied():
            if (folder_ / name).exists():  # a checkpoint from a run without the flag: the copy starts as loaded
                checkpoint.load_model(model, None, folder_ / name)
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        rng = folder_ / "rng" / f"rank_{self.rank}.pt"
        if not a.no_load_rng and rng.exists():
            checkpoint.set_rng_state(torch.load(rng, weights_only=False))
        dist.barrier()
        return {"optimizer_loaded": loaded_optim, "saved_world_size": state["world_size"]}

    def export_hf(self, out: str) -> str | None:
        path = checkpoint.export_hf(
            self.model, self.args.hf_checkpoint, out, self.rank, self.lora, self.args.save_hf_merged
        )
        dist.barrier()
        return str(path) if path else None

    def shutdown(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
