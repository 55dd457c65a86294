"""The GPU trainer's fused log-prob / entropy kernels against float64 autograd, run on this CPU by Triton's
interpreter (TRITON_INTERPRET=1, set before Triton is imported: hence a process of its own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import json, torch
from slime.trainer import log_probs_triton as fused
from slime.trainer.log_probs import token_log_probs

torch.manual_seed(0)
rows, vocab = 7, 2048 + 1000  # a vocabulary that is not a multiple of the kernel's block
out = []
for dtype in (torch.float32, torch.bfloat16):
    for temperature, entropy_grad in ((0.7, True), (1.0, False)):
        logits = (torch.randn(rows, vocab) * 3).to(dtype)
        logits[0, -1] = 40.0  # a row whose mass sits on the last column
        targets = torch.randint(0, vocab, (rows,))
        targets[0] = vocab - 1
        gl, ge = torch.randn(rows), torch.randn(rows)
        x = logits.double().requires_grad_()
        log_p = torch.log_softmax(x / temperature, -1)
        ref_lp, ref_ent = log_p.gather(1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
        ((ref_lp * gl.double()).sum() + (ref_ent * ge.double()).sum() * entropy_grad).backward()
        lp, ent, lse = fused.forward(logits, targets, temperature, True)
        grad = fused.backward(logits, targets, lse, ent, gl, ge if entropy_grad else None, temperature)
        # the chunked torch version on the same input: the error bf16 gradients have anyway
        y = logits.clone().requires_grad_()
        a, e = token_log_probs(y, targets, temperature, entropy_grad=entropy_grad)
        ((a * gl).sum() + ((e * ge).sum() if entropy_grad else 0)).backward()
        out.append({
            "dtype": str(dtype), "temperature": temperature, "entropy_grad": entropy_grad,
            "log_prob": (lp.double() - ref_lp).abs().max().item(),
            "entropy": (ent.double() - ref_ent).abs().max().item(),
            "grad": (grad.double() - x.grad).abs().max().item(),
            # in units of the bf16 spacing at each element: below 1 whether the cast rounds or truncates (Triton's
            # interpreter truncates; the GPU rounds to nearest)
            "grad_ulps": ((grad.double() - x.grad).abs() / (x.grad.abs() * 2**-7 + 1e-6)).max().item(),
            "torch_grad": (y.grad.double() - x.grad).abs().max().item(),
            "grad_dtype": str(grad.dtype), "no_entropy": fused.forward(logits, targets, temperature, False)[1],
        })
print(json.dumps(out))
"""


def test_fused_log_prob_kernels_match_float64():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in json.loads(done.stdout.strip().splitlines()[-1]):
        assert case["log_prob"] < 1e-5 and case["entropy"] < 1e-5, case
        assert case["grad_dtype"] == case["dtype"] and case["no_entropy"] is None, case
        if case["dtype"] == "torch.float32":
            assert case["grad"] < 1e-5, case
        else:  # the gradient is bf16, as the logits: within one bf16 step of the exact value
            assert case["grad_ulps"] < 1.0, case
