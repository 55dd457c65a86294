"""The reused sync buffer (GPU tensor mode with engines that copy before answering), exercised with CPU tensors:
every bucket of every sync goes through one buffer, each bucket's layout is built once, and what the engine reads
is each weight exactly, in the engines' dtype."""

import torch

from slime.sync.buckets import unflatten_bucket
from slime.sync.syncer import WeightSyncer


def _bucket(seed: int, sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(n, 3, generator=g)) for i, n in enumerate(sizes)]


def test_every_bucket_of_every_sync_travels_in_one_buffer(tmp_path):
    syncer = WeightSyncer([], "tensor", 1 << 20, 10, str(tmp_path), dtype="bfloat16")
    try:
        for sync in range(3):
            for index, sizes in enumerate(([5, 7], [11], [2, 3, 1])):
                bucket = _bucket(10 * sync + index, sizes)
                flat, metadata = syncer._fill_device_buffer(index, bucket)
                assert flat.data_ptr() == syncer.device_buffer.data_ptr()  # the start of the one buffer
                got = unflatten_bucket(flat.clone(), metadata)
                assert [n for n, _ in got] == [n for n, _ in bucket]
                for (_, a), (_, b) in zip(got, bucket, strict=True):
                    assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))
            if sync == 0:
                buffer, layouts = syncer.device_buffer, dict(syncer._layouts)
        assert syncer.device_buffer is buffer and all(syncer._layouts[i] is layouts[i] for i in layouts)

        bigger = _bucket(99, [400])  # a bucket larger than the buffer: a new buffer, every layout rebuilt
        flat, metadata = syncer._fill_device_buffer(1, bigger)
        assert syncer.device_buffer is not buffer and list(syncer._layouts) == [1]
        assert torch.equal(unflatten_bucket(flat, metadata)[0][1], bigger[0][1].to(torch.bfloat16))
        flat, metadata = syncer._fill_device_buffer(0, _bucket(1, [5, 7]))
        assert flat.data_ptr() == syncer.device_buffer.data_ptr() and sorted(syncer._layouts) == [0, 1]
    finally:
        syncer.close()
    assert syncer.device_buffer is None and not syncer._layouts
