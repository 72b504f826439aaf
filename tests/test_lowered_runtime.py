"""The part the paddle and mindspore runtimes share (vlmrt/runtimes/lowered.py), on a stand-in
framework that is torch itself and a decoder graph written by hand: no framework install, no
lowering, milliseconds. The frameworks' own tests (test_paddle_runtime.py, test_mindspore_runtime.py)
check every stage against eager; this file pins what they share: inputs by name (zeros for missing
ones, text positions widened for an M-RoPE graph), the lock-step cache rounded to the bucket, and
engine steps that write back only the positions the call wrote."""

from types import SimpleNamespace

import torch

from vlmrt.engine import StepInputs
from vlmrt.errors import VlmrtError
from vlmrt.export.manifest import StageInfo, TensorInfo
from vlmrt.runtimes.lowered import LoweredRuntime

L, H, S, HD, D, V = 2, 1, 8, 2, 4, 5  # layers, KV heads, slots, head dim, width, vocabulary


def _decoder_info() -> StageInfo:
    kv = [TensorInfo(f"past_key_values.{i}.{kind}", "float32", ("batch", H, "cache_sequence", HD))
          for i in range(L) for kind in ("key", "value")]
    inputs = (TensorInfo("inputs_embeds", "float32", ("batch", "sequence", D)),
              TensorInfo("position_ids", "int64", (3, "batch", "sequence")),  # an M-RoPE decoder
              TensorInfo("attention_mask", "int64", ("batch", "cache_sequence")),
              TensorInfo("cache_position", "int64", ("batch", "sequence")),
              TensorInfo("logits_index", "int64", ("batch",)), *kv)
    outputs = (TensorInfo("logits", "float32", ("batch", 1, V)),
               *[TensorInfo(f"present.{i}.{kind}", "float32", ("batch", H, "cache_sequence", HD))
                 for i in range(L) for kind in ("key", "value")])
    return StageInfo("decoder.graph", None, inputs, outputs)


class _Graph:
    """A decoder graph: writes each token's embedding (its first HD values) at its cache positions,
    and returns every other position changed (+100), as a graph's presents may hold anything where
    the call wrote nothing (its masked scratch)."""

    def __init__(self):
        self.calls = []

    def __call__(self, embeds, positions, mask, slots, at, *kv):
        self.calls.append({"positions": positions.shape, "mask": mask.shape, "kv": kv[0].shape})
        n, t = embeds.shape[:2]
        presents = []
        for past in kv:
            new = past + 100
            for r in range(n):
                new[r, :, slots[r]] = embeds[r, :, None, :HD].transpose(0, 1)
            presents.append(new)
        return (torch.zeros(n, 1, V), *presents)


class _TorchRuntime(LoweredRuntime):
    name, framework, export_format, seq_bucket = "fake", "torch", "fake", 4

    def __init__(self):  # no loading: the graphs are given
        self.graphs, self.programs = {"decoder": _decoder_info()}, {"decoder": _Graph()}
        self.num_layers, self.num_kv_heads, self.head_dim, self.max_context = L, H, HD, S
        self.device, self.dtype, self.keys, self.values, self.seq, self.past_len = torch.device("cpu"), torch.float32, [], [], 0, 0

    def to_fw(self, t):
        return t.clone()

    def to_torch(self, value):
        return value.clone()

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=getattr(torch, dtype))

    def cat_rows(self, a, b):
        return torch.cat([a, b])

    def take_rows(self, xs, rows):
        return [x[rows] for x in xs]


def test_lockstep_cache_rounds_to_the_bucket_and_text_positions_widen_for_an_m_rope_graph():
    rt = _TorchRuntime()
    rt.start(2, 5)  # 5 slots asked: rounded up to the bucket of 4, at most the context
    assert rt.seq == 8 and rt.keys[0].shape == (2, H, 8, HD)
    embeds = torch.randn(2, 3, D)
    rt.decode(embeds, torch.arange(3)[None].expand(2, -1), torch.ones(2, 3, dtype=torch.long), torch.arange(3))
    assert rt.programs["decoder"].calls[-1]["positions"] == (3, 2, 3)  # [n,T] text positions -> [3,n,T]
    assert torch.equal(rt.keys[0][:, 0, :3], embeds[..., :HD])  # the graph's presents are the cache now
    rt.reorder(torch.tensor([1, 1]))
    assert torch.equal(rt.keys[0][0], rt.keys[0][1])


def test_engine_step_sends_the_window_and_writes_back_only_its_own_positions():
    rt = _TorchRuntime()
    pool = rt.allocate_slots(3, 70)  # 70 positions + scratch: a window of 64 is shorter than a row
    for buf in pool.keys + pool.values:
        buf.fill_(7.0)
    embeds = torch.randn(2, 1, D)
    step = StepInputs(1, 3, embeds, torch.tensor([[[5], [9]]] * 3), torch.tensor([[5], [9]]),
                      torch.ones(3, 71, dtype=torch.long)[1:3], None, {}, window=10)
    logits = rt.run_step(step)
    assert logits.shape == (2, V)
    assert rt.programs["decoder"].calls[-1]["kv"] == (2, H, 64, HD)  # the window, not the whole row
    for buf in pool.keys + pool.values:
        assert torch.equal(buf[1, :, 5], embeds[0, 0, :HD][None]) and torch.equal(buf[2, :, 9], embeds[1, 0, :HD][None])
        written = torch.zeros_like(buf, dtype=torch.bool)
        written[1, :, 5] = written[2, :, 9] = True
        assert bool((buf[~written] == 7.0).all())  # nothing else came back (the graph changed every other position)


def test_the_start_up_line_names_the_framework_and_the_graphs(capsys, monkeypatch):
    """__init__'s checks and start-up line, with the loading hooks stubbed."""
    class Loaded(_TorchRuntime):
        lowered_kind = "hand-written graphs"

        def __init__(self, loaded):
            LoweredRuntime.__init__(self, loaded, threads=1)

        def fw(self):
            return SimpleNamespace(__version__="0.0")

        def set_threads(self, threads):
            self.set_to = threads

        def _lower(self, loaded):
            _TorchRuntime.__init__(self)
            self.kind = self.lowered_kind

    rt = Loaded(SimpleNamespace(weights=None, device=torch.device("cpu"), dtype=torch.float32, export_dir=None))
    assert rt.set_to == 1 and rt.model.num_layers == L
    assert "fake runtime: torch 0.0 on the CPU, hand-written graphs" in capsys.readouterr().err


def test_a_runtime_list_loads_mindspore_before_paddle(monkeypatch):
    """MindSpore cannot load after Paddle in one process: a list naming both loads MindSpore first,
    and one that lacks it still builds (its runtime reports the missing extra itself)."""
    import vlmrt.runtimes.mindspore as msrt
    from vlmrt.runtimes import load_frameworks

    calls = []

    def fake_import():
        calls.append(1)
        raise VlmrtError("not installed")

    monkeypatch.setattr(msrt, "import_mindspore", fake_import)
    load_frameworks(["eager", "mindspore"])
    load_frameworks(["paddle", "onnx"])
    assert calls == []
    load_frameworks(["eager", "paddle", "mindspore"])  # the VlmrtError is left for the runtime
    assert calls == [1]
