"""One training rank: an FSDP2-sharded Hugging Face policy (plus a frozen reference), AdamW, and the RL step.

Every rank receives the whole rollout (it is small next to the model) and takes its own share of each optimizer
step, so advantages and loss normalisers are computed over the global batch without extra communication. All
ranks run the same number of forward/backward passes (a rank with less data runs zero-weight padding passes),
because every FSDP pass is a collective.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from slime.algorithms.advantages import ADVANTAGE_ESTIMATORS
from slime.sync.syncer import WeightSyncer
from slime.trainer.loss import STATS, rl_loss
from slime.trainer.optimizer import build_optimizer
from slime.trainer.packing import forward_log_probs, split_micro_batches

logger = logging.getLogger(__name__)
PAD_PASS = ([0, 0], 1)  # tokens and response length of a padding pass: one predicted token, weight 0


def load_model(path: str, device: torch.device, mesh, trainable: bool) -> torch.nn.Module:
    """The HF model in fp32, each decoder layer and then the root sharded with FSDP2 (bf16 compute on GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    # bf16 compute on CPU measured ~10x slower in backward than fp32 (docs/benchmarks.md): keep fp32 there
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


class TrainActor:
    """Ray actor (wrapped with ray.remote by slime.ray.train_group). Rank `rank` of `world_size`."""

    def __init__(self, args: Any, rank: int, world_size: int, master_addr: str, master_port: int):
        self.args, self.rank, self.world_size = args, rank, world_size
        logging.basicConfig(level=os.environ.get("SLIME_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(0)  # Ray exposes this rank's GPU as device 0
        else:
            torch.set_num_threads(args.train_threads or max(1, (os.cpu_count() or 1) // world_size))
        self.device = torch.device("cuda" if use_cuda else "cpu")
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if use_cuda else "gloo",  # metrics and object gathers are CPU tensors
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        )
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (world_size,))
        torch.manual_seed(args.seed)
        self.model = load_model(args.hf_checkpoint, self.device, mesh, trainable=True)
        self.model.train()
        self.ref_model = (
            load_model(args.ref_load or args.hf_checkpoint, self.device, mesh, False) if args.use_kl_loss else None
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, args)
        self.syncer: WeightSyncer | None = None
        self.step = 0

    # ------------------------------------------------------------------ helpers
    def _passes(self, indices_per_rank: list[list[int]], lengths: list[int]) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices), padded with [] up to the largest count of any rank."""
        a = self.args
        max_tokens = a.max_tokens_per_gpu if a.use_dynamic_batch_size else None
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

    def _forward(self, model, data: dict, mb: list[int], grad: bool, entropy_grad: bool = False):
        tokens = [data["tokens"][i] for i in mb] if mb else [PAD_PASS[0]]
        rlens = [data["response_lengths"][i] for i in mb] if mb else [PAD_PASS[1]]
        with torch.set_grad_enabled(grad):
            return forward_log_probs(model, tokens, rlens, self.args.rollout_temperature, entropy_grad)

    def _log_probs_of(self, model, data: dict, indices_per_rank: list[list[int]]) -> dict[int, torch.Tensor]:
        lengths = [len(t) for t in data["tokens"]]
        out = {}
        for mb in self._passes(indices_per_rank, lengths):
            lp, _ = self._forward(model, data, mb, grad=False)
            for i, chunk in zip(mb, lp.split([data["response_lengths"][i] for i in mb]) if mb else [], strict=True):
                out[i] = chunk.cpu()
        return out

    # ------------------------------------------------------------------ public
    def log_probs(self, data: dict) -> list[list[float]]:
        """Current policy's log-probs of every sample's response tokens (all ranks must call; rank 0's answer is
        complete)."""
        n = len(data["tokens"])
        shares = [list(range(r, n, self.world_size)) for r in range(self.world_size)]
        mine = self._log_probs_of(self.model, data, shares)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, {i: t.tolist() for i, t in mine.items()})
        merged = {k: v for part in gathered for k, v in part.items()}
        return [merged[i] for i in range(n)]

    def train(self, rollout_id: int, data: dict) -> dict[str, float]:
        """All optimizer steps of one rollout. `data`: tokens, response_lengths, loss_masks, rewards and
        rollout_log_probs, one entry per sample in rollout order. Returns metrics averaged over the steps."""
        a, start, world = self.args, time.monotonic(), self.world_size
        rewards = torch.tensor(data["rewards"], dtype=torch.float32)
        advantages = ADVANTAGE_ESTIMATORS[a.advantage_estimator](
            rewards, data["response_lengths"], a.n_samples_per_prompt, a
        )
        g = a.global_batch_size
        if len(data["tokens"]) % g:
            raise ValueError(
                f"the rollout has {len(data['tokens'])} samples, not a multiple of --global-batch-size {g}"
            )
        steps = [list(range(s, s + g)) for s in range(0, len(data["tokens"]), g)]
        shares = [[step[r::world] for r in range(world)] for step in steps]
        everything = [[i for step in shares for i in step[r]] for r in range(world)]
        if a.use_rollout_logprobs:
            missing = [i for i, n in enumerate(data["response_lengths"]) if len(data["rollout_log_probs"][i]) != n]
            if missing:
                raise ValueError(
                    f"--use-rollout-logprobs: {len(missing)} samples (first: #{missing[0]}) have no engine log-prob "
                    "per response token; return them from the generate function or drop the flag"
                )
            old = {i: torch.tensor(data["rollout_log_probs"][i]) for i in everything[self.rank]}
        else:
            old = self._log_probs_of(self.model, data, everything)
        ref = self._log_probs_of(self.ref_model, data, everything) if self.ref_model is not None else None
        lengths = [len(t) for t in data["tokens"]]
        totals = torch.zeros(len(STATS) + 1, dtype=torch.float64)
        tokens = torch.zeros(1, dtype=torch.float64)
        for step, step_shares in zip(steps, shares, strict=True):
            if a.calculate_per_token_loss:
                normalizer = float(sum(sum(data["loss_masks"][i]) for i in step))
            else:
                normalizer = float(len(step))
            sums = torch.zeros(len(STATS), dtype=torch.float64)
            for mb in self._passes(step_shares, lengths):
                log_probs, entropy = self._forward(self.model, data, mb, grad=True, entropy_grad=a.entropy_coef != 0)
                batch = self._micro_batch(data, mb, advantages, old, ref, log_probs.device)
                loss, stats = rl_loss(log_probs, entropy, batch, a, max(normalizer, 1.0))
                (loss * world).backward()  # FSDP averages gradients over ranks; the loss is a share of a global sum
                sums += stats
                tokens += sum(lengths[i] for i in mb)
            dist.all_reduce(sums)
            totals += torch.cat([sums, torch.tensor([self._clip_and_step()], dtype=torch.float64)]) / len(steps)
        dist.all_reduce(tokens)
        seconds = time.monotonic() - start
        out = {f"train/{k}": v for k, v in zip((*STATS, "grad_norm"), totals.tolist(), strict=True)}
        out.update({"train/lr": self.scheduler.get_last_lr()[0], "train/seconds": seconds,
                    "train/param_norm": self._param_norm(),
                    "train/tokens_per_s": float(tokens) / seconds, "train/optimizer_steps": self.step})  # fmt: skip
        return out

    @staticmethod
    def _micro_batch(data: dict, mb: list[int], advantages, old, ref, device) -> dict[str, Any]:
        """Per-token tensors [R] of one micro-batch; a padding pass gets one token of weight 0."""

        def cat(parts: list) -> torch.Tensor:
            return torch.cat([torch.as_tensor(p, dtype=torch.float32) for p in parts]).to(device)

        if not mb:
            zero = torch.zeros(1, device=device)
            return {"mask": zero, "advantages": zero, "old_log_probs": zero, "lengths": [PAD_PASS[1]]}
        rollout = data.get("rollout_log_probs")
        return {
            "mask": cat([data["loss_masks"][i] for i in mb]),
            "advantages": cat([advantages[i] for i in mb]),
            "old_log_probs": cat([old[i] for i in mb]),
            "ref_log_probs": cat([ref[i] for i in mb]) if ref is not None else None,
            "rollout_log_probs": cat([rollout[i] for i in mb])
            if rollout and all(len(rollout[i]) == len(data["loss_masks"][i]) for i in mb)
            else None,
            "lengths": [data["response_lengths"][i] for i in mb],
        }

    def _clip_and_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.args.clip_grad if self.args.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(norm)

    def _param_norm(self) -> float:
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        for p in self.model.parameters():
            shard = p.data.to_local() if hasattr(p.data, "to_local") else p.data
            local += shard.double().square().sum()
        dist.all_reduce(local)
        return float(local.sqrt())

    def connect_engines(self, engine_urls: list[str]) -> None:
        a = self.args
        disk_dir = os.path.join(os.path.abspath(a.output_dir), "weight_sync")
        self.syncer = WeightSyncer(engine_urls, a.update_weight_mode, a.update_weight_buffer_size,
                                   a.update_weight_timeout, disk_dir)  # fmt: skip

    def update_weights(self, version: str) -> dict[str, float]:
        if self.syncer is None:
            raise RuntimeError("update_weights before connect_engines: the trainer does not know the engines")
        out = self.syncer.sync(self.model, version, self.rank)
        dist.barrier()
        return out

    def shutdown(self) -> None:
        if self.syncer is not None:
            self.syncer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
