"""`vlmrt bench` end to end on the tiny preset, its outputs, its arithmetic and its bad-input errors.

The compiled runtime runs here with dynamo's "eager" backend (its buckets, buffers and warm-up
accounting, without Inductor's C++ compile time; tests/test_compiled.py checks Inductor).
"""

import csv
import json

import pytest
import torch

from vlmrt.bench import (COLUMNS, TIMED, BenchConfig, add_speedups, agreement, build_prompt, first_divergence,
                         format_table, make_workload, preprocess, run_bench)
from vlmrt.cli import main
from vlmrt.errors import VlmrtError

FAST = {"compiled": {"backend": "eager"}}


def _config(tmp_path, **kw) -> BenchConfig:
    base = dict(model="minigpt4-tiny", out=str(tmp_path), runtimes=("eager", "compiled", "hf"), batches=(1, 2),
                new_tokens=8, repeats=1, warmup=1, runtime_options=FAST)
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    return run_bench(_config(out), log=lines.append), out, lines


def test_every_runtime_and_batch_is_measured(sweep):
    result, _, _ = sweep
    rows = result["rows"]
    assert [(r["runtime"], r["batch"]) for r in rows] == [
        (n, b) for n in ("eager", "compiled", "hf") for b in (1, 2)]
    for r in rows:
        assert r["error"] is None, r
        assert all(r[k] > 0 for k in TIMED), r
        assert r["ttft_ms"] >= r["vision_ms"] and r["e2e_ms"] > r["ttft_ms"]
        assert r["peak_mem_mib"] > 0 and r["warmup_s"] > 0
        assert r["agreement"] == 1.0 and r["first_divergence"] is None  # fp32: same math, same tokens
        assert r["speedup_vs_hf"] > 0 and r["speedup_vs_eager"] > 0
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["runtime"] == "eager")
    assert all(r["compile_s"] is not None for r in rows if r["runtime"] == "compiled")


def test_outputs_are_valid_json_csv_and_png(sweep):
    result, out, lines = sweep
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    meta = on_disk["meta"]
    assert meta["model"] == "minigpt4-tiny" and meta["synthetic_weights"] and meta["config"]["new_tokens"] == 8
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and len(table) == 6
    assert float(table[0]["tokens_per_s"]) == pytest.approx(result["rows"][0]["tokens_per_s"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib is not installed" in line for line in lines)
    else:
        assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_is_reported(sweep):
    _, _, lines = sweep
    assert "compiled batch 2: warm-up x1" in lines
    assert "batch 1: run 1/1 of eager, compiled, hf" in lines  # timed runs go round-robin
    assert any("reference: eager fp32 greedy, batch 2" in line for line in lines)


def test_one_at_a_time_frees_each_runtime_before_building_the_next(tmp_path, monkeypatch):
    """--one-at-a-time: each runtime is built, measured at every batch size and freed before the next
    one is built, so a sweep holds one runtime's weights at a time; the table keeps --runtime's order."""
    import weakref

    import vlmrt.bench as bench

    built, alive_at_build = [], []

    so_far = []

    def spy(*args, **kwargs):
        alive_at_build.append([name for name, ref in built if ref() is not None])
        if (tmp_path / "results.json").exists():  # written after each runtime: a later crash loses nothing
            so_far.append(json.loads((tmp_path / "results.json").read_text()))
        runner = make_runner(*args, **kwargs)
        built.append((args[0], weakref.ref(runner)))
        return runner

    def fails_half_built(*args, **kwargs):  # a runtime whose constructor fails after allocating
        half_built = torch.nn.Linear(4, 4)
        built.append(("onnx", weakref.ref(half_built)))
        raise VlmrtError("cannot build it here") if not so_far else RuntimeError("In transformed code:\n  x = f(y)\n"
                                                                                 "InvalidArgumentError: bad index")

    make_runner = bench.make_runner
    monkeypatch.setattr(bench, "make_runner", lambda *a, **k: (fails_half_built if a[0] == "onnx" else spy)(*a, **k))
    result = run_bench(_config(tmp_path, runtimes=("eager", "onnx", "hf"), batches=(1, 2), new_tokens=4,
                               one_at_a_time=True), log=lambda _: None)
    assert [(r["runtime"], r["batch"]) for r in result["rows"]] == [
        (n, b) for n in ("eager", "onnx", "hf") for b in (1, 2)]
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in result["rows"] if r["runtime"] != "onnx")
    assert all("cannot build it here" in r["error"] for r in result["rows"] if r["runtime"] == "onnx")
    assert alive_at_build == [[], []]
    assert any("one after another" in n for n in result["meta"]["notes"])
    (before_hf,) = so_far
    assert not before_hf["meta"]["complete"] and result["meta"]["complete"]
    assert [(r["runtime"], r["batch"]) for r in before_hf["rows"]] == [(n, b) for n in ("eager", "onnx") for b in (1, 2)]
    assert before_hf["rows"][0]["tokens_per_s"] == result["rows"][0]["tokens_per_s"]
    built.clear(), alive_at_build.clear()
    rows = run_bench(_config(tmp_path, runtimes=("onnx", "hf"), batches=(1,), new_tokens=2), log=lambda _: None)["rows"]
    assert alive_at_build == [[]]  # interleaved: the failed runtime's error, kept all along, holds no frames
    assert rows[0]["error"] == "failed to build: RuntimeError: InvalidArgumentError: bad index"  # a framework's error
    assert rows[1]["error"] is None and rows[1]["tokens_per_s"] > 0  # ends no sweep


def test_a_framework_error_in_a_run_is_an_error_row():
    """A runtime that fails inside its framework at run time (not a VlmrtError) gets an error row
    naming the framework's reason; the caller's sweep goes on."""
    from types import SimpleNamespace

    from vlmrt.bench_batch import _attempt

    def paddle_like():
        raise ValueError("In transformed code:\n    out = gather_nd(x, i)\n    [operator < run_program > error]\n"
                         "    InvalidArgumentError: index 2 >= dim 2\n")

    lines = []
    row = _attempt(paddle_like, "paddle", SimpleNamespace(prompts=["a"], prompt_tokens=9), _config("/tmp"), lines.append)
    assert row["error"] == "failed: ValueError: InvalidArgumentError: index 2 >= dim 2" and row["tokens_per_s"] is None
    assert lines[0].startswith("paddle batch 1: failed: ValueError: In transformed code:")
    assert _attempt(lambda: None, "paddle", None, None, lines.append) is None


def test_cli_prints_a_table(tmp_path, capsys):
    code = main(["bench", "--model", "minigpt4-tiny", "--runtime", "eager,hf", "--batch", "1", "--max-new-tokens", "4",
                 "--prompt-tokens", "60", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| runtime | batch |" in captured.out and "| hf | 1 |" in captured.out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["prompt_tokens"] == 60 + 8  # text tokens + the tiny preset's 8 image tokens


def test_unknown_runtime_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(VlmrtError, match=r"unknown runtime 'tensorrt'.*available: .*compiled.*hf"):
        run_bench(_config(tmp_path, runtimes=("eager", "tensorrt")))
    assert main(["bench", "--model", "minigpt4-tiny", "--runtime", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown runtime 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    code = main(["bench", "--model", "minigpt4-tiny", "--runtime", "compiled", "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_batch_above_the_cache_maximum_is_an_error_row(tmp_path):
    result = run_bench(_config(tmp_path, runtimes=("compiled",), agreement=False,
                               runtime_options={"compiled": {"backend": "eager", "max_batch": 1}}), log=lambda _: None)
    one, two = result["rows"]
    assert one["error"] is None and one["tokens_per_s"] > 0
    assert "above the compiled runtime's cache maximum of 1" in two["error"] and two["tokens_per_s"] is None
    assert "error: batch of 2" in format_table(result["rows"])


def test_the_batch_table_and_parity_run_on_the_engine(photo):
    """A batch of B rows is B engine requests (Pipeline's path), decoded together, with the
    lock-step loop's tokens; parity's free-running tokens come from one engine per runtime."""
    from conftest import load_tiny
    from vlmrt.bench import VlmrtRunner
    from vlmrt.config import GenerationConfig
    from vlmrt.eval.parity import EngineTokens
    from vlmrt.generate import generate
    from vlmrt.processor import Processor

    loaded = load_tiny("minigpt4-tiny")
    processor, cfg = Processor(loaded.spec, loaded.tokenizer), GenerationConfig(max_new_tokens=5)
    batch = preprocess(processor, make_workload(processor, 2, "Describe this image."), loaded.device)[0]
    runner = VlmrtRunner("eager", loaded, {})
    timings, tokens = runner.generate(batch, 5)
    lock_step = generate(runner.runtime, batch, cfg, loaded.tokenizer)
    assert tokens.tolist() == lock_step.token_ids and tokens.shape == (2, 5)
    assert runner.engine.timers["decode_steps"] == 4  # both rows admitted at once: 4 decode calls for 5 tokens
    assert timings["ttft_ms"] >= timings["vision_ms"] > 0 and timings["ms_per_token"] > 0
    run_tokens = EngineTokens(processor, loaded.tokenizer)
    one = processor([photo], ["Hi"])
    assert run_tokens(runner.runtime, one, cfg) == generate(runner.runtime, one, cfg, loaded.tokenizer).token_ids
    assert list(run_tokens.engines) == [id(runner.runtime)] and run_tokens.engines[id(runner.runtime)].timers["decode_steps"] == 4


@pytest.mark.parametrize("kw, message", [
    (dict(batches=(0,)), "batch sizes"),
    (dict(new_tokens=1), "--max-new-tokens >= 2"),
    (dict(dtype="fp8"), "unknown dtype"),
    (dict(new_tokens=100_000), "above the model's context"),
    (dict(prompt_tokens=1), "--prompt-tokens must be at least 2"),
    (dict(new_tokens=2, profile=True), "--profile needs --max-new-tokens of at least 3"),  # before any run, not after
])
def test_bad_settings_are_clear_errors(tmp_path, kw, message):
    with pytest.raises(VlmrtError, match=message):
        run_bench(_config(tmp_path, **kw), log=lambda _: None)


def test_bad_batch_list_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--model", "minigpt4-tiny", "--batch", "1,two", "--out", str(tmp_path)]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_agreement_divergence_and_speedups():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert agreement(ref, ref) == 1.0
    assert agreement(torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8]]), ref) == 7 / 8
    assert first_divergence(ref, ref) is None
    assert first_divergence(torch.tensor([[1, 2, 3, 4], [5, 0, 7, 8]]), ref) == 1
    rows = [{"runtime": n, "batch": 1, "e2e_ms": ms, "error": None} for n, ms in (("hf", 400.0), ("eager", 200.0), ("compiled", 100.0))]
    rows.append({"runtime": "onnx", "batch": 1, "e2e_ms": None, "error": "no export"})
    add_speedups(rows)
    assert rows[2]["speedup_vs_hf"] == 4.0 and rows[2]["speedup_vs_eager"] == 2.0
    assert rows[3]["speedup_vs_hf"] is None


def _chosen_length(name: str, n: int | None):
    from conftest import load_tiny
    from vlmrt.processor import Processor

    loaded = load_tiny(name)
    processor = Processor(loaded.spec, loaded.tokenizer)
    question = build_prompt(processor, n)
    work = make_workload(processor, 1, question, n)
    batch = preprocess(processor, work, torch.device("cpu"))[0]
    full = processor(work.images, work.prompts)  # the rendered prompt, uncut
    return loaded, work, batch, full


@pytest.mark.parametrize("n", [2, 40, 300])
def test_prompt_of_a_chosen_length_keeps_bos_image_and_question(n):
    loaded, work, batch, full = _chosen_length("minigpt4-tiny", n)
    ids, full, img = batch["input_ids"][0].tolist(), full["input_ids"][0].tolist(), loaded.spec.image_token_id
    assert len(ids) == n + loaded.spec.num_image_tokens == work.prompt_tokens and ids[0] == full[0]
    assert ids.count(img) == full.count(img) and (n < 30 or ids[-20:] == full[-20:])
    assert batch["attention_mask"].sum() == len(ids)


def test_default_question_is_the_rendered_template():
    _, work, batch, full = _chosen_length("minigpt4-tiny", None)
    assert work.prompts == ["Describe this image in detail."] and torch.equal(batch["input_ids"], full["input_ids"])


def test_cut_prompt_keeps_mrope_positions_consistent():
    """SliMM: positions of the cut prompt are the ones its processor computes for those ids."""
    from vlmrt.models.slimm import mrope_position_ids

    loaded, work, batch, full = _chosen_length("slimm-tiny", 6)
    ids, img = batch["input_ids"], loaded.spec.image_token_id
    assert int((ids != img).sum()) == 6 and int((ids == img).sum()) == int((full["input_ids"] == img).sum())
    opts = dict(loaded.spec.hook_options)
    grids = [tuple(g) for g in batch["image_grid_thw"].tolist()] if "image_grid_thw" in batch else [
        (1, loaded.spec.image_size // opts["patch_size"], loaded.spec.image_size // opts["patch_size"])]
    expected = mrope_position_ids(ids, batch["attention_mask"], grids, opts["merge_size"], img)
    assert torch.equal(batch["position_ids"], expected)
    assert not torch.equal(batch["position_ids"], full["position_ids"][..., -ids.shape[1]:])  # really shifted


@pytest.mark.parametrize("name", ["minicpm-v-tiny", "slimm-tiny"])
def test_chosen_prompt_length_on_dynamic_image_families(tmp_path, name):
    """Families whose image takes a variable number of tokens (slices, native resolution): the row
    counts the tokens the image really takes, and every runtime runs the cut prompt."""
    loaded, work, batch, _ = _chosen_length(name, 12)
    img = loaded.spec.image_token_id
    assert work.prompt_tokens == batch["input_ids"].shape[1] == 12 + int((batch["input_ids"] == img).sum())
    result = run_bench(_config(tmp_path, model=name, prompt_tokens=12, batches=(1,), new_tokens=4,
                               runtimes=("eager", "compiled")), log=lambda _: None)  # MiniCPM has no hf baseline
    for r in result["rows"]:
        assert r["error"] is None and r["prompt_tokens"] == work.prompt_tokens, r


# ----------------------------------------------------------------------------- GPU (marked)
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device,dtype", [
    ("cpu", "bf16"),  # half precision through the same sweep on CPU, so CI keeps the path working
    pytest.param("cuda", "fp16", marks=pytest.mark.gpu),
])
def test_bench_in_half_precision(tmp_path, device, dtype):
    cpu = device == "cpu"
    runtimes = ("eager", "hf") if cpu else ("eager", "compiled", "hf")  # compiled bf16 on CPU: test_compiled.py
    result = run_bench(BenchConfig(model="minigpt4-tiny", out=str(tmp_path), runtimes=runtimes,
                                   batches=(1, 2), new_tokens=16, dtype=dtype, device=device, repeats=1 if cpu else 2,
                                   warmup=1, runtime_options=FAST if cpu else {}), log=lambda _: None)
    for r in result["rows"]:
        assert r["error"] is None and r["agreement"] >= 0.9, r


@pytest.mark.parametrize("preset", ["qwen-vl-tiny", "slimm-tiny", "minicpm-v-tiny"])
def test_other_families_bench_with_their_vision_inputs(tmp_path, preset):
    """Families with extra vision inputs (SliMM's image_grid_thw, MiniCPM's slices) and q/k/v biases
    (Qwen: transformers' Qwen2 baseline) go through the sweep and the agreement check."""
    runtimes = ("eager", "hf") if preset != "minicpm-v-tiny" else ("eager",)  # MiniCPM's scaled decoder has no hf twin
    result = run_bench(_config(tmp_path, model=preset, runtimes=runtimes, batches=(1,), new_tokens=4),
                       log=lambda _: None)
    for r in result["rows"]:
        assert r["error"] is None, r
        assert r["agreement"] is not None and r["decode_ms_per_token"] > 0


def test_the_throughput_plot_ticks_the_measured_batch_sizes():
    pytest.importorskip("matplotlib")
    from vlmrt.bench import figure

    row = dict(preprocess_ms=1.0, vision_ms=2.0, prefill_ms=3.0, ttft_ms=5.0, e2e_ms=20.0, error=None)
    rows = [{**row, "runtime": rt, "batch": b, "tokens_per_s": 10.0 * b} for rt in ("eager", "hf") for b in (1, 2, 4, 10)]
    meta = {"model": "m", "machine": "cpu", "config": {"new_tokens": 8, "dtype": "fp32"}}
    fig = figure({"meta": meta, "rows": rows})
    assert list(fig.axes[0].get_xticks()) == [1, 2, 4, 10]  # integers, not 1.2, 1.4, ...
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_weight_bytes_of_a_runtime_whose_model_is_only_its_cache_geometry():
    """A lowered runtime (paddle) keeps the cache's geometry as `model`: the bench counts the loaded
    model's decoder weights instead of failing on it."""
    from types import SimpleNamespace

    from conftest import load_tiny
    from vlmrt.bench_weights import bytes_per_token
    from vlmrt.quantize import decoder_weight_bytes
    from vlmrt.runtimes.onnx import CacheGeometry

    loaded = load_tiny("minigpt4-tiny")
    geometry = CacheGeometry(2, 2, 8, 64)
    lowered = SimpleNamespace(runtime=SimpleNamespace(model=geometry, loaded=loaded))
    assert bytes_per_token(lowered) == decoder_weight_bytes(loaded.model) > 0
    assert bytes_per_token(SimpleNamespace(runtime=SimpleNamespace(model=geometry))) is None
