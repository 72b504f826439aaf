"""The compiled runtime against the eager reference: identical greedy tokens on CPU (Inductor
without CUDA graphs), bucketing and padding, bad input; CUDA graphs and fp16 on a GPU (marked).

Compiling is slow on a 2-core CPU, so every runtime is built once per module (fixtures) and
compiles few shapes: batch 1 and 3 share batch bucket 4 and one prompt bucket.
"""

import pytest
import torch

from conftest import assert_runtime_parity, load_tiny
from families import FAMILY_TESTS
from vlmrt.cli import main
from vlmrt.config import GenerationConfig
from vlmrt.errors import VlmrtError
from vlmrt.pipeline import Pipeline
from vlmrt.runtimes import runtime_class
from vlmrt.runtimes.compiled import CompiledRuntime, pick_bucket, round_up

PROMPTS = ["Describe this image.", "What is the person in this picture holding in the left hand?", "Hi"]
ONE_BUCKET = {"max_batch": 4, "batch_buckets": (4,)}  # batch 1 and 3 both run padded to 4 rows


def _answers(pipe, photo, rows: int, new_tokens: int = 64):
    cfg = pipe.generation_config(max_new_tokens=new_tokens, stop_strings=(), stop_token_ids=())  # exactly N tokens
    return pipe([photo] * rows, PROMPTS[:rows], cfg).token_ids


@pytest.fixture(scope="module", params=sorted(FAMILY_TESTS))
def traced(request):
    """(eager, compiled) per family, compiled with dynamo's "eager" backend: the family's stages
    traced into graphs, and the runtime's buckets, padding, cache window and static buffers, without
    Inductor's C++ compile time (Inductor itself is checked below, on one family)."""
    loaded = load_tiny(FAMILY_TESTS[request.param]["tiny"])
    return Pipeline(loaded, "eager"), Pipeline(loaded, "compiled", {**ONE_BUCKET, "backend": "eager"})


def test_compiled_graphs_match_eager_per_family(traced, photo):
    """3 requests of different lengths, 32 tokens each (Inductor's 64 are below, on one family). On
    the engine every request is prefilled alone, so the one-row case is the first of these rows."""
    eager, compiled = traced
    assert _answers(compiled, photo, 3, 32) == _answers(eager, photo, 3, 32)


def test_compiled_graphs_match_eager_tensor_by_tensor(traced):
    """Features, embeddings, prefill logits, the cache after prefill and 8 decode steps' logits, on
    3 rows of different lengths, within fp32 tolerances (vlmrt/eval/tensor_parity.py)."""
    eager, compiled = traced
    assert_runtime_parity(eager.loaded, compiled.runtime, steps=8)


@pytest.fixture(scope="module")
def inductor():
    loaded = load_tiny("minigpt4-tiny")
    return Pipeline(loaded, "eager"), Pipeline(loaded, "compiled", {**ONE_BUCKET, "compile_vision": False})


def test_inductor_matches_eager_tensor_by_tensor(inductor):
    eager, compiled = inductor
    assert_runtime_parity(eager.loaded, compiled.runtime, steps=8)


def test_inductor_matches_eager_64_tokens(inductor, photo):
    eager, compiled = inductor
    expected = _answers(eager, photo, 3)
    assert _answers(compiled, photo, 3) == expected
    spent = compiled.runtime.compile_s
    assert _answers(compiled, photo, 1) == expected[:1]  # a second request reuses the compiled graphs
    assert compiled.runtime.compile_s == spent


def test_a_new_shape_is_announced_and_its_compile_kept_out_of_the_stage_times(photo):
    """Each stage says when it compiles for a new shape and how long it took. Pipeline runs on the
    engine, which compiles every shape it serves at warm-up (one probe request, before the first
    request's clock starts), so no request's stage times hold a compile and compile_ms stays 0."""
    pipe = Pipeline(load_tiny("minigpt4-tiny"), "compiled", {**ONE_BUCKET, "backend": "eager"})
    seen = []
    pipe.runtime.on_compile = lambda what: (seen.append([what]), seen[-1].append)[1]  # done(seconds) appends
    cfg = pipe.generation_config(max_new_tokens=4)
    first = pipe([photo], ["Hi"], cfg).timings
    size = pipe.loaded.spec.image_size
    assert [w.split(" (")[0] for w, *_ in seen] == [f"vision for pixels 1x3x{size}x{size}",
                                                  "prefill for one request, any length", "decode for 4 engine rows"], seen
    assert all(len(s) == 2 and s[1] > 0 for s in seen)  # each notice was ended with its duration
    assert first["compile_ms"]["total"] == 0 and first["vision_ms"] > 0
    assert first["ttft_ms"] == pytest.approx(first["vision_ms"] + first["prefill_ms"])
    assert sum(pipe.runtime.compile_by_stage.values()) == pytest.approx(sum(s[1] for s in seen))
    seen.clear()
    again = pipe([photo], ["Hi"], cfg).timings
    assert seen == [] and again["compile_ms"]["total"] == 0


def test_buckets():
    assert round_up(117, 32) == 128 and round_up(128, 32) == 128
    assert pick_bucket(3, (1, 2, 4, 8)) == 4 and pick_bucket(8, (1, 2, 4, 8)) == 8
    rt = CompiledRuntime(load_tiny("minigpt4-tiny"), max_batch=10)
    assert rt.batch_buckets == (1, 2, 4, 8, 10)
    rt.start(3, 117)
    assert rt._seq == 128  # the attention window: the request rounded up to seq_multiple


def test_registered_and_cache_allocated_once():
    loaded = load_tiny("minigpt4-tiny")
    rt = runtime_class("compiled")(loaded, max_batch=2, max_seq=96)
    assert isinstance(rt, CompiledRuntime)
    assert rt.storage.keys[0].shape == (2, loaded.model.num_kv_heads, 96, loaded.model.head_dim)


def test_batch_above_cache_maximum_is_a_clear_error(photo):
    loaded = load_tiny("minigpt4-tiny")
    rt = CompiledRuntime(loaded, max_batch=2)
    with pytest.raises(VlmrtError, match="batch of 3 is above the compiled runtime's cache maximum of 2"):
        rt.start(3, 100)
    # the engine queues rows beyond its slots instead of failing: 3 rows on 2 slots answer as eager does
    cfg = GenerationConfig(max_new_tokens=4)
    queued = Pipeline(loaded, "compiled", {"max_batch": 2, "backend": "eager"})([photo] * 3, PROMPTS, cfg)
    assert queued.token_ids == Pipeline(loaded)([photo] * 3, PROMPTS, cfg).token_ids


def test_request_longer_than_the_cache_is_a_clear_error():
    rt = CompiledRuntime(load_tiny("minigpt4-tiny"), max_seq=64)
    with pytest.raises(VlmrtError, match="cache holds 64"):
        rt.start(1, 100)


def test_bad_options_are_clear_errors():
    loaded = load_tiny("minigpt4-tiny")
    with pytest.raises(VlmrtError, match="unknown compiled-runtime option.*max_batchh"):
        CompiledRuntime(loaded, max_batchh=2)
    with pytest.raises(VlmrtError, match="window_buckets are key positions.*got \\(0,\\)"):
        CompiledRuntime(loaded, window_buckets=(0,))
    if not torch.cuda.is_available():
        with pytest.raises(VlmrtError, match="cuda_graphs=True needs the model on a CUDA device"):
            CompiledRuntime(loaded, cuda_graphs=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_compiled_on_cuda_without_a_gpu_is_a_clear_error(photo, capsys):
    with pytest.raises(VlmrtError, match="no CUDA GPU"):
        Pipeline.load("minigpt4-tiny", runtime="compiled", device="cuda")
    code = main(["run", "--model", "minigpt4-tiny", "--runtime", "compiled", "--device", "cuda",
                 "--image", str(photo), "--prompt", "Hi"])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------- GPU (marked)
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_cuda_graphs_fp32_match_eager(photo, rows):
    from vlmrt.models import load_model

    loaded = load_model("minigpt4-tiny", device="cuda")
    eager, compiled = Pipeline(loaded, "eager"), Pipeline(loaded, "compiled", dict(ONE_BUCKET))
    assert compiled.runtime.use_graphs
    expected = _answers(eager, photo, rows)
    assert _answers(compiled, photo, rows) == expected
    assert _answers(compiled, photo, rows) == expected  # replays of the captured graphs


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device,dtype", [
    ("cpu", "bf16"),  # the same code path on CPU (dynamo's eager backend), so CI keeps it working
    pytest.param("cuda", "fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", "bf16", marks=pytest.mark.gpu),
])
def test_half_precision_compiled_agrees_with_fp32_eager_over_256_tokens(device, dtype):
    from vlmrt.bench import VlmrtRunner, agreement, make_workload, preprocess
    from vlmrt.models import load_model
    from vlmrt.processor import Processor

    ref = load_model("minigpt4-tiny", device=device)
    half = load_model("minigpt4-tiny", device=device, dtype=dtype)
    processor = Processor(ref.spec, ref.tokenizer)
    batch = preprocess(processor, make_workload(processor, 2, PROMPTS[0]), ref.device)[0]
    tokens = VlmrtRunner("eager", ref, {}).generate(batch, 256)[1]  # [2,256] fp32 greedy
    options = {"max_batch": 2, **({"backend": "eager"} if device == "cpu" else {})}
    picks = VlmrtRunner("compiled", half, options).predict(batch, tokens)  # teacher-forced
    assert agreement(picks, tokens) >= (0.95 if dtype == "fp16" else 0.9)
