"""The CUDA decode-attention kernel (slime.engine.triton_decode) on this CPU, through Triton's interpreter (a process
of its own: TRITON_INTERPRET must be set before Triton is imported)."""

import json
import os
import subprocess
import sys
from pathlib import Path

CHECK = r"""
import json, torch
import slime.engine.triton_decode as td

td._sm_count = lambda device: 4  # a small "GPU": 3 sequences x 2 kv heads get 2 context splits, 24 sequences 1
torch.manual_seed(0)
out = {}
for batch in (3, 24):
    heads, kv, dim, bs, per = 4, 2, 16, 4, 12
    blocks = batch * per + 1
    k = torch.randn(blocks * bs, kv, dim)
    v = torch.randn(blocks * bs, kv, dim)
    q = torch.randn(batch, heads, dim)
    lens = torch.randint(1, per * bs, (batch,)).int()
    tables = (torch.randperm(blocks - 1)[: batch * per] + 1).view(batch, per).int()
    pos = (lens - 1).long()
    last = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    k_new, v_new = torch.randn(batch, kv, dim), torch.randn(batch, kv, dim)
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[last], v_ref[last] = k_new, v_new
    k[last], v[last] = 1e4, -1e4  # what the kernel must overwrite before it reads
    got = td.paged_decode(q, k, v, tables, lens, dim**-0.5, bs, k_new, v_new)
    again = td.paged_decode(q, k, v, tables, lens, dim**-0.5, bs)  # the cache now holds them: same result
    err = 0.0
    for i in range(batch):
        n = int(lens[i])
        slots = tables[i].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
        kk = k_ref[slots].double().repeat_interleave(heads // kv, 1)
        vv = v_ref[slots].double().repeat_interleave(heads // kv, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), kk) * dim**-0.5, -1)
        err = max(err, float((got[i].double() - torch.einsum("hn,nhd->hd", p, vv)).abs().max()))
    out[batch] = {
        "splits": td.splits_for(batch, kv, 0),
        "err": err,
        "cache_written": bool(torch.equal(k, k_ref) and torch.equal(v, v_ref)),
        "same_after": float((got - again).abs().max()),
    }
# through paged_attention: the runner's `kernel` flag picks the kernel (no cache slots given: it finds them), else the
# torch path (given the slots) computes the same step
from types import SimpleNamespace
from slime.engine.paged_attention import PagedForward, paged_attention
batch, heads, kv, dim, bs, per = 3, 4, 2, 16, 4, 12
blocks = batch * per + 1
cache = [torch.randn(blocks * bs, kv, dim) for _ in range(2)]
lens = torch.randint(1, per * bs, (batch,)).int()
tables = (torch.randperm(blocks - 1)[: batch * per] + 1).view(batch, per).int()
pos = (lens - 1).long()
last = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
q, kn, vn = torch.randn(batch, heads, 1, dim), torch.randn(batch, kv, 1, dim), torch.randn(batch, kv, 1, dim)
outs, caches = [], []
for kernel in (True, False):
    k, v = cache[0].clone(), cache[1].clone()
    fwd = PagedForward([k], [v], None if kernel else last, block_tables=tables, seq_lens=lens, block_size=bs,
                       kernel=kernel)
    outs.append(paged_attention(SimpleNamespace(layer_idx=0), q, kn, vn, None, dim**-0.5, paged=fwd)[0])
    caches.append((k, v))
out["routed"] = {
    "diff": float((outs[0] - outs[1]).abs().max()),
    "same_cache": all(torch.equal(a, b) for a, b in zip(caches[0], caches[1])),
}
print(json.dumps(out))
"""


def test_decode_kernel_writes_the_new_token_and_attends_to_it():
    """With and without context splits: the kernel stores the step's new key and value at the sequence's last
    position (exactly, and nowhere else) and its output equals float64 attention over the cache including them.
    Through paged_attention, the runner's `kernel` flag (not the tensors' device) routes a decode step to the
    kernel, which needs no cache slots."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r[b]["splits"] for b in ("3", "24")] == [2, 1], r
    routed = r.pop("routed")
    assert routed["same_cache"] and routed["diff"] < 1e-5, routed
    for case in r.values():
        assert case["cache_written"] and case["err"] < 1e-5 and case["same_after"] < 1e-6, r
