"""The embedded engine's HTTP server, run for real as a child process on loopback, checked against the protocol."""

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

from slime.engine.launch import launch_engine
from slime.utils.http_utils import post, request_sync


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    srv = launch_engine(tiny_model_path, tmp_path_factory.mktemp("logs"), num_threads=1, max_running_requests=32)
    yield srv
    srv.stop()


def call(server, path, payload=None, method="POST", timeout=120):
    status, body = request_sync(method, server.url + path, payload, timeout=timeout)
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body


def test_generate_fields_and_shapes(server):
    status, out = call(
        server,
        "/generate",
        {
            "input_ids": [1, 2, 3, 4],
            "sampling_params": {"max_new_tokens": 5, "ignore_eos": True},
            "return_logprob": True,
            "rid": "abc",
            "model": "router-adds-this",
        },
    )
    assert status == 200
    assert set(out) == {"text", "output_ids", "meta_info"} and isinstance(out["text"], str)
    meta = out["meta_info"]
    assert meta["id"] == "abc" and meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == 5 and meta["weight_version"] == "default"
    triples = meta["output_token_logprobs"]
    assert len(triples) == 5 == meta["output_token_logprobs_length"]
    assert [t[1] for t in triples] == out["output_ids"]
    assert all(isinstance(t[0], float) and t[0] <= 0 and t[2] is None for t in triples)


def test_text_input_batch_and_stop_conditions(server):
    status, outs = call(server, "/generate", {"text": ["Hello", "World"], "sampling_params": {"max_new_tokens": 3}})
    assert status == 200 and isinstance(outs, list) and len(outs) == 2
    _, free = call(
        server, "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    )
    stop_tok = free["output_ids"][2]
    _, out = call(
        server,
        "/generate",
        {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 6, "temperature": 0, "stop_token_ids": [stop_tok]}},
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    assert out["output_ids"] == free["output_ids"][: free["output_ids"].index(stop_tok) + 1]  # stop token kept


def test_unknown_sampling_key_is_400_naming_it(server):
    status, body = call(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_token": 3}})
    assert status == 400 and "max_new_token" in json.dumps(body)
    status, body = call(server, "/generate", {"input_ids": [], "sampling_params": {}})
    assert status == 400


def test_logprobs_equal_transformers_recomputation(server, tiny_model_path):
    """fp32: engine logprobs = log_softmax(logits / T) recomputed by transformers, within 1e-4."""
    from transformers import AutoModelForCausalLM

    prompt, temperature = [1, 9690, 198, 2683, 359, 253], 0.7
    _, out = call(
        server,
        "/generate",
        {
            "input_ids": prompt,
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 24, "temperature": temperature, "ignore_eos": True},
        },
    )
    ids = out["output_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].double()
    ref = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    got = torch.tensor([t[0] for t in out["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert ref.std() > 0.05  # the check is not vacuous: logprobs vary along the response


def test_prompt_logprobs_from_logprob_start_len(server, tiny_model_path):
    """SGLang's prompt scoring: max_new_tokens 0 with logprob_start_len answers at once with the log-prob of every
    input token from that position (None for position 0), equal to a transformers forward; with generation, both
    input and output log-probs come back."""
    from transformers import AutoModelForCausalLM

    prompt, temperature = [1, 9690, 198, 2683, 359, 253, 4491, 30], 0.8
    params = {"max_new_tokens": 0, "temperature": temperature}
    status, whole = call(
        server,
        "/generate",
        {"input_ids": prompt, "sampling_params": params, "return_logprob": True, "logprob_start_len": 0},
    )
    assert status == 200 and whole["output_ids"] == [] and whole["meta_info"]["finish_reason"]["type"] == "length"
    entries = whole["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt and entries[0][0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].double()
    ref = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    got = torch.tensor([e[0] for e in entries[1:]], dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    _, tail = call(
        server,
        "/generate",
        {
            "input_ids": prompt,
            "sampling_params": params | {"max_new_tokens": 3},
            "return_logprob": True,
            "logprob_start_len": 5,
        },
    )
    assert [e[1] for e in tail["meta_info"]["input_token_logprobs"]] == prompt[5:]
    assert torch.allclose(
        torch.tensor([e[0] for e in tail["meta_info"]["input_token_logprobs"]]).double(), ref[4:], atol=1e-4
    )
    assert len(tail["output_ids"]) == 3
    status, bad = call(
        server,
        "/generate",
        {"input_ids": prompt, "sampling_params": params, "return_logprob": True, "logprob_start_len": 99},
    )
    assert status == 400 and "logprob_start_len 99" in bad["error"]["message"]


def test_concurrent_requests_are_batched(server):
    async def many():
        payload = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
        return await asyncio.gather(*[post(server.url + "/generate", payload) for _ in range(12)])

    outs = asyncio.run(many())
    assert all(len(o["output_ids"]) == 40 for o in outs)
    _, info = call(server, "/server_info", method="GET")
    assert info["internal_states"][0]["max_batch_rows"] >= 6
    assert (info["backend"], info["backend_fallback"]) == ("paged", None)  # --backend auto on a Llama


def _long_request(server, rid, result):
    payload = {"input_ids": [1, 2], "rid": rid, "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
    result.append(call(server, "/generate", payload))


def _wait_running(server, n=1):
    for _ in range(400):
        if call(server, "/v1/loads", method="GET")[1]["loads"][0]["num_running_reqs"] >= n:
            return
        time.sleep(0.02)
    raise AssertionError("request never started running")


def test_abort_mid_generation_keeps_partial_tokens(server):
    result = []
    t = threading.Thread(target=_long_request, args=(server, "long-1", result))
    t.start()
    _wait_running(server)
    time.sleep(0.3)
    assert call(server, "/abort_request", {"rid": "long-1"})[0] == 200
    t.join(60)
    status, out = result[0]
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(out["output_ids"]) < 100000
    assert call(server, "/v1/loads", method="GET")[1]["loads"][0]["num_running_reqs"] == 0


def test_pause_abort_holds_new_requests_until_continue(server):
    result, later = [], []
    t = threading.Thread(target=_long_request, args=(server, "long-2", result))
    t.start()
    _wait_running(server)
    assert call(server, "/pause_generation", {"mode": "abort"})[1]["status"] == "ok"
    t.join(60)
    assert result[0][1]["meta_info"]["finish_reason"]["type"] == "abort"
    held = threading.Thread(
        target=lambda: later.append(
            call(server, "/generate", {"input_ids": [3], "sampling_params": {"max_new_tokens": 2}})
        )
    )
    held.start()
    time.sleep(0.5)
    assert not later  # held while paused
    assert call(server, "/flush_cache", method="GET")[0] == 200
    call(server, "/continue_generation", {})
    held.join(60)
    assert later[0][0] == 200 and len(later[0][1]["output_ids"]) >= 1


def test_a_weight_sync_in_place_lets_running_requests_go_on(server, tiny_model_path, tmp_path):
    """--weight-sync-pause-mode in_place: a request running during the sync is not aborted; it goes on with the new
    weights, and its answer names both versions (read into the sample's weight_versions by weight_versions_of)."""
    from transformers import AutoModelForCausalLM

    from slime.sync.syncer import WeightSyncer
    from slime.utils.types import weight_versions_of

    old = call(server, "/model_info", method="GET")[1]["weight_version"]
    result = []
    t = threading.Thread(target=_long_request, args=(server, "long-in-place", result))
    t.start()
    _wait_running(server)
    syncer = WeightSyncer([server.url], "tensor", 1 << 20, 60, str(tmp_path), pause_mode="in_place")
    try:
        stats = syncer.sync(AutoModelForCausalLM.from_pretrained(tiny_model_path), "5", rank=0)
    finally:
        syncer.close()
    assert stats["sync/tensors"] > 0
    time.sleep(0.3)
    assert call(server, "/v1/loads", method="GET")[1]["loads"][0]["num_running_reqs"] == 1  # still generating
    call(server, "/abort_request", {"rid": "long-in-place"})
    t.join(60)
    meta = result[0][1]["meta_info"]
    spans = meta["weight_versions"]
    assert [s["version"] for s in spans] == [old, "5"] and meta["weight_version"] == "5"
    assert 0 < spans[0]["end"] == spans[1]["start"] < spans[1]["end"] == len(result[0][1]["output_ids"])
    assert weight_versions_of(meta) == [old, "5"]


def test_a_bad_request_is_refused_at_the_door_and_harms_no_other(server, tiny_model_path):
    """Each bad field gets a 400 naming it before anything runs; four requests generating meanwhile all finish
    whole (a bad id or value inside the batched step used to abort every one of them)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_path).vocab_size
    innocent = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
    results = []
    threads = [threading.Thread(target=lambda: results.append(call(server, "/generate", innocent))) for _ in range(4)]
    for t in threads:
        t.start()
    _wait_running(server, 4)
    bad = [
        ({"input_ids": [1, vocab]}, f"input_ids[1]={vocab} is not a token id"),
        ({"input_ids": [-1]}, "input_ids[0]=-1"),
        ({"input_ids": [2**63]}, f"input_ids[0]={2**63}"),
        ({"input_ids": [True, 3]}, "input_ids[0]=True"),
        ({"input_ids": [1], "sampling_params": {"temperature": float("nan")}}, "temperature=nan"),
        ({"input_ids": [1], "sampling_params": {"min_new_tokens": 1.5}}, "min_new_tokens=1.5"),
        ({"input_ids": [1], "sampling_params": {"min_new_tokens": -1}}, "min_new_tokens=-1"),
        ({"input_ids": [1], "sampling_params": {"min_new_tokens": float("inf")}}, "min_new_tokens=inf"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": True}}, "max_new_tokens=True"),
        (
            {"input_ids": [1], "sampling_params": {"stop_token_ids": [vocab + 5], "min_new_tokens": 2}},
            f"stop_token_ids[0]={vocab + 5}",
        ),
    ]
    for body, message in bad:
        status, out = call(server, "/generate", body)
        assert status == 400 and message in out["error"]["message"], (body, out)
    status, out = call(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}})
    assert status == 200 and out["output_ids"] == []
    for t in threads:
        t.join(120)
    assert len(results) == 4
    for status, out in results:
        assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length"
        assert len(out["output_ids"]) == 300


def test_an_oversized_body_is_413_before_it_is_read(server):
    """A /generate body over --max-request-mb (64 MiB) is refused with 413 naming the limit: at once when its
    Content-Length says so, and as soon as a chunked one (no length) grows past it. The server serves on."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server.url)
    big = json.dumps({"text": "x" * (65 << 20)}).encode()
    for chunked in (False, True):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.putrequest("POST", "/generate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(big)))))
        conn.endheaders()
        try:
            for i in range(0, len(big), 1 << 20):
                piece = big[i : i + (1 << 20)]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            conn.send(b"0\r\n\r\n" if chunked else b"")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 413 and "limit of 67108864 bytes (--max-request-mb)" in body["error"]["message"]
    status, out = call(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and len(out["output_ids"]) == 2


def test_a_long_text_is_tokenised_without_stalling_health(server):
    """A /generate text of 6 MB (the review's 4.8 MB one blocked /health for 11.5 s) is tokenised off the event
    loop: /health answers within a second all along, and the prompt is then refused as longer than the context."""
    text = "the quick brown fox jumps over the lazy dog " * 140_000
    result = {}

    def long_request():
        result["answer"] = call(server, "/generate", {"text": text, "sampling_params": {"max_new_tokens": 1}})

    worker = threading.Thread(target=long_request)
    worker.start()
    latencies = []
    while worker.is_alive():
        t0 = time.monotonic()
        assert call(server, "/health", method="GET", timeout=30)[0] == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
    worker.join()
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies  # tokenising 6 MB takes seconds
    status, body = result["answer"]
    assert status == 400 and "context" in json.dumps(body), body


def test_control_endpoints(server):
    assert call(server, "/health", method="GET")[0] == 200
    assert call(server, "/health_generate", method="GET")[0] == 200
    status, info = call(server, "/model_info", method="GET")
    assert status == 200 and info["weight_version"] and info["architectures"] == ["LlamaForCausalLM"]
    _, loads = call(server, "/v1/loads", method="GET")
    assert set(loads["loads"][0]) >= {"num_running_reqs", "num_waiting_reqs"}
    assert loads["accelerator"] == "cpu" and loads["num_accelerators"] == 0


def test_prefix_cache_hits_are_reported_and_flushed(server):
    """Two samples of one 40-token prompt: the second reuses the first's two full 16-token blocks and says so in
    meta_info.cached_tokens; /flush_cache answers what it dropped."""
    prompt = [(7 * i) % 900 + 50 for i in range(40)]
    body = {"input_ids": [prompt, prompt], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    status, outs = call(server, "/generate", body)
    assert status == 200
    assert sorted(o["meta_info"]["cached_tokens"] for o in outs) == [0, 32]
    status, text = call(server, "/flush_cache", method="GET")
    assert status == 200 and "Cache flushed" in str(text) and "prefix blocks dropped" in str(text)


def test_update_weights_from_disk_changes_outputs_and_version(server, smollm2_path, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    greedy = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    before = call(server, "/generate", greedy)[1]["output_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path)
    status, out = call(server, "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "7"})
    assert status == 200 and out["success"], out
    after = call(server, "/generate", greedy)[1]
    assert after["meta_info"]["weight_version"] == "7" and after["output_ids"] != before
    status, out = call(server, "/update_weights_from_disk", {"model_path": smollm2_path})  # wrong shapes
    assert status == 400 and not out["success"] and "shape" in out["message"]
    call(server, "/update_weights_from_disk", {"model_path": tiny_model_path, "weight_version": "8"})
    assert call(server, "/generate", greedy)[1]["output_ids"] == before


def _tensor_update(server, named, version="bad"):
    import base64
    import pickle

    payload = base64.b64encode(pickle.dumps(named)).decode()
    body = {"serialized_named_tensors": [payload], "weight_version": version}
    return call(server, "/update_weights_from_tensor", body)


def test_a_rejected_weight_update_changes_nothing(server, smollm2_path, tiny_model_path, tmp_path):
    """Every weight update is checked whole before the first byte is copied: a refused one (400 naming the problem)
    leaves the greedy output and the weight version exactly as they were."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    greedy = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    call(server, "/update_weights_from_disk", {"model_path": tiny_model_path, "weight_version": "base"})
    before = call(server, "/generate", greedy)[1]["output_ids"]
    state = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    name, weight = next((n, t) for n, t in state.items() if n.endswith("q_proj.weight"))
    changed = weight + 1.0
    two_layers = tmp_path / "two"
    two_layers.mkdir()
    save_file({n: t.contiguous() + 1.0 for n, t in list(state.items())[:2]}, str(two_layers / "model.safetensors"))
    nan = changed.clone()
    nan[0, 0] = float("nan")
    refused = [
        (call(server, "/update_weights_from_disk", {"model_path": smollm2_path}), "shape"),
        (call(server, "/update_weights_from_disk", {"model_path": str(two_layers)}), "missing from the update"),
        (_tensor_update(server, [(name, changed), ("model.no_such.weight", changed)]), "no_such"),
        (_tensor_update(server, [(name, changed), (name.replace("layers.0.", "layers.1."), nan)]), "NaN or infinite"),
        (_tensor_update(server, [(name, changed.long())]), "dtype"),
        (_tensor_update(server, [(name, "a string")]), "not a tensor"),
        (_tensor_update(server, []), "holds no tensors"),
        (call(server, "/update_weights_from_tensor", {"serialized_named_tensors": ["not base64 !"]}), "could not"),
    ]
    for (status, out), message in refused:
        assert status == 400 and not out["success"] and message in out["message"], out
        assert call(server, "/model_info", method="GET")[1]["weight_version"] == "base"
        assert call(server, "/generate", greedy)[1]["output_ids"] == before
    # the same two tensors, declared partial, are taken; the whole model then restores the outputs
    status, out = call(server, "/update_weights_from_disk", {"model_path": str(two_layers), "partial": True})
    assert status == 200 and out["success"], out
    status, out = call(server, "/update_weights_from_disk", {"model_path": tiny_model_path, "weight_version": "9"})
    assert status == 200 and call(server, "/generate", greedy)[1]["output_ids"] == before


def test_a_finite_float16_update_with_a_large_norm_is_taken(server, tiny_model_path):
    """The finiteness check reduces in float32: a float16 weight whose values are all finite but whose norm is above
    float16's largest value (65504) is a valid update, not a NaN."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    name, weight = next((n, t) for n, t in state.items() if n.endswith("q_proj.weight"))
    big = torch.full(weight.shape, 2000.0, dtype=torch.float16)  # norm 2000 * 64 = 128,000
    status, out = _tensor_update(server, [(name, big)], version="big")
    assert status == 200 and out["success"], out
    status, out = call(server, "/update_weights_from_disk", {"model_path": tiny_model_path, "weight_version": "base"})
    assert status == 200, out


def test_stop_string_ends_generation_and_is_trimmed_from_text_only(server, tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    # seeded sampling: the same request gives the same tokens, so a stopped run is a prefix of the free one
    seeded = {"max_new_tokens": 24, "temperature": 1.0, "sampling_seed": 3, "ignore_eos": True}
    _, free = call(server, "/generate", {"input_ids": [5, 6, 7], "sampling_params": seeded})
    ids = free["output_ids"]
    # a stop string that first appears with some token after the first one
    stop = next(
        piece.strip()
        for k in range(1, len(ids))
        for piece in [tok.decode(ids[k : k + 1])]
        if piece.strip() and piece.strip() not in tok.decode(ids[:k])
    )
    _, out = call(server, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {**seeded, "stop": stop}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in out["text"] and free["text"].startswith(out["text"])
    assert out["output_ids"] == free["output_ids"][: len(out["output_ids"])]
    untrimmed = {**seeded, "stop": stop, "no_stop_trim": True}
    _, kept = call(server, "/generate", {"input_ids": [5, 6, 7], "sampling_params": untrimmed})
    assert stop in kept["text"]


def test_release_and_resume_memory_for_a_colocated_trainer(tiny_model_path, tmp_path):
    """/release_memory_occupation frees the weights (requests wait), /resume_memory_occupation allocates them
    again but keeps the engine paused until a weight sync ends with /continue_generation; then the waiting request
    runs on the synced weights."""
    srv = launch_engine(tiny_model_path, tmp_path, num_threads=1)
    try:
        greedy = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        before = call(srv, "/generate", greedy)[1]["output_ids"]
        assert call(srv, "/server_info", method="GET")[1]["weight_bytes"] > 0
        cpu_memory = {"gpu_memory_allocated_before": 0, "gpu_memory_allocated_after": 0}  # GPU bytes; none on CPU
        assert call(srv, "/release_memory_occupation", {"tags": ["weights", "kv_cache"]}) == (200, cpu_memory)
        info = call(srv, "/server_info", method="GET")[1]
        assert info["weights_released"] and info["weight_bytes"] == 0
        assert call(srv, "/health_generate", method="GET")[0] == 200  # held on purpose, not unhealthy
        assert call(srv, "/release_memory_occupation", {"tags": ["optimizer"]})[0] == 400
        waiting: dict = {}
        thread = threading.Thread(target=lambda: waiting.update(out=call(srv, "/generate", greedy)))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive()  # no weights: the request waits
        assert call(srv, "/resume_memory_occupation", {"tags": ["weights"]}) == (200, cpu_memory)
        time.sleep(1.0)
        assert thread.is_alive()  # weights allocated but not synced: still waiting
        assert call(srv, "/update_weights_from_disk", {"model_path": tiny_model_path, "weight_version": "2"})[0] == 200
        assert call(srv, "/continue_generation", {})[0] == 200
        thread.join(60)
        status, out = waiting["out"]
        assert status == 200 and out["output_ids"] == before and out["meta_info"]["weight_version"] == "2"
    finally:
        srv.stop()


def test_an_engine_holds_its_port_from_the_moment_it_is_launched(tiny_model_path, tmp_path):
    """The launcher binds the port and the server inherits the listening socket: nothing else can take the port
    while the engine loads its model (a port chosen free and bound seconds later could be taken meanwhile), and
    the first probe is answered as soon as the server serves."""
    srv = launch_engine(tiny_model_path, tmp_path, num_threads=1, wait=False)
    try:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind((host, int(port)))
        srv.wait_ready("/health", 120)
        assert call(srv, "/health", method="GET")[0] == 200
    finally:
        srv.stop()


def test_server_takes_sglang_launch_server_spelling():
    """A teacher launched as slime's OPD example launches SGLang (`--tp`, `--chunked-prefill-size`) starts here with
    slime-serve swapped in; a tensor-parallel size the engine cannot honour is refused by argparse."""
    from slime.engine.server import parse_args

    flags = "--model-path m --host 0.0.0.0 --port 13141 --tp 1 --chunked-prefill-size 4096 --mem-fraction-static 0.6"
    args = parse_args(flags.split())
    assert (args.chunked_prefill_size, args.tp_size, args.mem_fraction_static) == (4096, 1, 0.6)
    with pytest.raises(SystemExit):
        parse_args(flags.replace("--tp 1", "--tp 2").split())


def test_adapter_only_and_merged_syncs_serve_the_same_model(server, tiny_model_path, tmp_path):
    """A LoRA policy synced as its adapters (the engine merges them into the weights it started with) and as
    merged weights gives the same greedy tokens and log-probs; a second adapter update replaces the first rather
    than adding to it; a whole-weight update afterwards restores the base exactly."""
    from transformers import AutoModelForCausalLM

    from slime.sync.syncer import WeightSyncer
    from slime.trainer.lora import LoraSpec, add_adapters

    greedy = {"input_ids": [1, 5, 9, 22, 40], "sampling_params": {"max_new_tokens": 8, "temperature": 0},
              "return_logprob": True}  # fmt: skip

    def answer():
        out = call(server, "/generate", greedy)[1]
        return out["output_ids"], [x[0] for x in out["meta_info"]["output_token_logprobs"]]

    def sync(model, version, adapters_only):
        # 1.5 KB buckets: a factor pair never travels apart (the engine needs both at once)
        syncer = WeightSyncer([server.url], "tensor", 1536, 60, str(tmp_path), adapters_only=adapters_only)
        try:
            return syncer.sync(model, version, rank=0)
        finally:
            syncer.close()

    def set_b(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.2)

    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    sync(base_model, "base", False)
    base = answer()
    lora = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraSpec(4, 8.0, 0.0, "all-linear"))
    try:
        for seeds in ([0], [0, 1]):  # the second adapter update must replace the first, not pile onto it
            sync(base_model, "base", False)  # what an engine starts with
            for seed in seeds:
                set_b(seed)
                small = sync(lora, f"a{seed}", True)
            by_adapters = answer()
            full = sync(lora, f"m{seed}", False)
            by_merged = answer()
            assert small["sync/bytes"] < full["sync/bytes"] / 3
            assert by_adapters[0] == by_merged[0] != base[0]
            assert by_adapters[1] == pytest.approx(by_merged[1], abs=1e-4)
        lora_a = {n: p for n, p in lora.named_parameters() if ".lora_A." in n}
        bad = [(n.replace(".default", ""), t) for n, t in list(lora_a.items())[:1]]  # lora_A without its lora_B
        syncer = WeightSyncer([server.url], "tensor", 1 << 20, 60, str(tmp_path))
        try:
            with pytest.raises(Exception, match="lora_A and lora_B come together"):
                syncer._send(0, bad)
        finally:
            syncer.close()
    finally:
        sync(base_model, "base2", False)
    assert answer() == base


def test_an_http2_probe_is_refused_with_one_plain_log_line(server):
    """The router probes each worker it adds for gRPC with an HTTP/2 preface: refused, logged as one line, not as
    aiohttp's traceback, and the server goes on answering."""
    import socket
    import time as _time

    host, port = server.url.removeprefix("http://").split(":")
    before = len(server.log_path.read_text(errors="replace"))
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    deadline = _time.monotonic() + 10
    while "HTTP/2" not in server.log_path.read_text(errors="replace")[before:] and _time.monotonic() < deadline:
        _time.sleep(0.1)
    new = server.log_path.read_text(errors="replace")[before:]
    assert "refused an HTTP/2 connection (a gRPC probe)" in new, new[-2000:]
    assert "Traceback" not in new and "PRI/Upgrade" not in new, new[-2000:]
    assert call(server, "/health", method="GET")[0] == 200
