"""Methods vLLM's workers gain for slime (`--worker-extension-cls slime.engine.vllm_worker.WorkerExtension`), called
through vLLM's /collective_rpc by the vllm backend's front (slime.engine.vllm_adapter). Imported inside vLLM's worker
processes, which may run another environment than the run's: it needs only torch and safetensors."""

from __future__ import annotations


class WorkerExtension:
    def slime_load_weights(self, folder: str) -> None:
        """Reload the served model in place from the safetensors files in `folder` (checkpoint names), through
        vLLM's layer-wise reload (it re-runs each layer's processing into the kernels' layout, e.g. the CPU's
        packed linear weights), then tie the LM head to the embedding again where the model ties them: the
        layer-wise reload finds no weight for a tied head in the checkpoint and puts the old one back, which
        would leave the head serving the previous weights."""
        runner = self.model_runner
        runner.reload_weights(weights_path=folder, is_checkpoint_format=True)
        model = runner.get_model()
        config = getattr(model, "config", None)
        head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
        embed = getattr(inner, "embed_tokens", None)
        if getattr(config, "tie_word_embeddings", False) and head is not None and embed is not None:
            head.tie_weights(embed)
            # the head's kernel may hold its own prepared copy of the weight (on CPU a packed GEMM): rebuild it
            method = getattr(head, "quant_method", None)
            if hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(head)
