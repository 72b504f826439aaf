"""`vlmrt bench --profile`: per-decode-step figures from two profiled passes, on a runner whose
costs are known (so the arithmetic is checked), on a real runtime, and through the CLI."""

import json

import pytest
import torch

from conftest import load_tiny
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.profiling import TOP_OPS, format_profile, profile_generation

pytestmark = pytest.mark.usefixtures("one_thread")


class CountedRunner:
    """generate(batch, n): a prefill of 3 big matmuls, then per decode step one small matmul and one
    read of a tensor's value (a host sync on a GPU), like a loop that checks stops with .item()."""

    def __init__(self):
        self.big, self.small = torch.randn(512, 512), torch.randn(384, 384)  # steps of ~1 ms, well above noise

    def generate(self, batch, n):
        for _ in range(3):
            self.big @ self.big
        for _ in range(n - 1):
            (self.small @ self.small)[0, 0].item()
        return {}, torch.zeros(1, n, dtype=torch.long)


def test_per_step_figures_come_from_the_difference_of_two_passes(tmp_path):
    p = profile_generation(CountedRunner(), {}, 16, torch.device("cpu"), tmp_path / "trace.json")
    assert p["steps"] == 14 and p["busy_kind"] == "cpu aten ops"
    assert p["syncs"] == pytest.approx(1.0)  # one .item() per decode step; the prefill's matmuls cancel out
    assert 0 < p["busy_ms"] <= 1.25 * p["wall_ms"]  # a step is all matmul here: busy ~ wall, up to noise
    assert p["gap_ms"] == pytest.approx(max(p["wall_ms"] - p["busy_ms"], 0.0))
    ops = {o["op"]: o for o in p["top_ops"]}
    assert ops["aten::mm"]["calls"] == 3 + 15  # the traced pass: 16 tokens
    shares = [o["share"] for o in p["top_ops"]]
    assert 0 < len(shares) <= TOP_OPS and shares == sorted(shares, reverse=True)
    assert 0.9 < sum(shares) <= 1 + 1e-9  # all matmul here: the few ops listed hold nearly all the busy time
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])


def test_a_real_runtime_is_profiled():
    from vlmrt.bench import VlmrtRunner, make_workload, preprocess
    from vlmrt.processor import Processor

    loaded = load_tiny("minigpt4-tiny")
    processor = Processor(loaded.spec, loaded.tokenizer)
    batch = preprocess(processor, make_workload(processor, 2, "Describe this image."), loaded.device)[0]
    p = profile_generation(VlmrtRunner("eager", loaded, {}), batch, 6, loaded.device)
    assert p["steps"] == 4 and p["wall_ms"] > 0 and p["busy_ms"] > 0 and p["trace"] is None
    assert all(o["op"].startswith("aten::") for o in p["top_ops"])
    assert "| eager | 2 |" in format_profile([{"runtime": "eager", "batch": 2, "profile": p}])


def test_too_few_tokens_to_profile_is_a_clear_error():
    with pytest.raises(VlmrtError, match="at least 3"):
        profile_generation(CountedRunner(), {}, 2, torch.device("cpu"))


def test_bench_profile_flag_writes_traces_and_a_table(tmp_path, capsys):
    code = main(["bench", "--model", "minigpt4-tiny", "--runtime", "eager", "--batch", "1", "--new-tokens", "4",
                 "--repeats", "1", "--no-agreement", "--profile", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "per decode step (profiled pass)" in out and "| eager | 1 |" in out
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["profile"]["steps"] == 2 and (tmp_path / "trace-eager-b1.json").exists()


@pytest.mark.gpu
def test_compiled_decode_on_cuda_syncs_at_most_once_per_step():
    """The fast path's promise: device work fills the step, and the loop waits once per token."""
    from vlmrt.bench import VlmrtRunner, make_workload, preprocess
    from vlmrt.models import load_model
    from vlmrt.processor import Processor

    loaded = load_model("minigpt4-tiny", device="cuda", dtype="fp16")
    processor = Processor(loaded.spec, loaded.tokenizer)
    batch = preprocess(processor, make_workload(processor, 1, "Describe this image."), loaded.device)[0]
    runner = VlmrtRunner("compiled", loaded, {"max_batch": 1})
    runner.generate(batch, 32)  # compile and capture
    p = profile_generation(runner, batch, 32, loaded.device)
    assert p["busy_kind"] == "cuda kernels" and p["busy_ms"] > 0
    assert p["syncs"] <= 1.5, p
