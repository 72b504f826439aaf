"""Tensor-parallel loading (vlmrt/weights.py + vlmrt/tp/shard.py): a rank that loads a release
checkpoint for its shard holds exactly the slice of the tp=1 load (fp and int8), and reads only its
rows or columns of every split decoder weight. No group is needed: the shard plan is per rank, and
the 2-rank group's run from a release folder is in tests/tp_worker.py."""

import copy
import json

import pytest
import torch

from conftest import load_tiny
from release_files import write_minigpt4_release
from test_minicpmv import _write_release as write_minicpmv_release
from test_qwen_vl import small_ranks
from test_qwen_vl import write_release as write_qwen_release
from test_slimm import slimm_config_json, tiny_model
from vlmrt.errors import VlmrtError
from vlmrt.models import load_model
from vlmrt.quantize import parse_weights, quantize_model
from vlmrt.tp.runtime import sharded_runtime
from vlmrt.tp.shard import Shard, shard_model

SPLIT = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # always split at --tp 2 (k/v may be replicated)
DECODER = (*SPLIT, "k_proj", "v_proj")


def _write(kind: str, folder):
    if kind == "minigpt4-bin":  # the Vicuna folder as .bin shards with an index
        write_minigpt4_release(load_tiny("minigpt4-tiny"), folder, "bin")
    elif kind == "qwen-bin":  # fused c_attn in .bin shards, as released
        write_qwen_release(folder, "bin")
    elif kind == "qwen-safetensors":
        write_qwen_release(folder, "safetensors")
    elif kind == "minicpmv":  # two safetensors shards with an index
        write_minicpmv_release(load_tiny("minicpm-v-tiny"), folder)
    else:  # slimm: one model.safetensors, one KV head (replicated on both ranks), q/k/v biases
        _write_slimm_release(folder)
    return folder


def _write_slimm_release(folder):
    """slimm-tiny's weights in SliMM's layout, with a small tokenizer (loading reads any tokenizer.json;
    slimm-tiny's own 151k-token one costs seconds per load)."""
    from safetensors.torch import save_file

    from vlmrt.models.qwen_vl import build_qwen_tokenizer

    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(slimm_config_json()))
    build_qwen_tokenizer(small_ranks()).save_pretrained(str(folder))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]


def _same_int8(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    return [k for k in ba if not torch.equal(ba[k], bb[k])]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """kind -> (folder, its tp=1 load), written and loaded once for the module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = _write(kind, tmp_path_factory.mktemp("release") / kind)
            cache[kind] = folder, load_model(str(folder))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["minigpt4-bin", "qwen-bin", "qwen-safetensors", "minicpmv", "slimm"])
def test_a_rank_loads_exactly_the_slice_of_the_tp1_load(releases, kind):
    folder, whole = releases(kind)
    int8 = parse_weights("int8")
    whole_int8 = quantize_model(copy.deepcopy(whole.model), int8)
    for rank in range(2):
        mine = load_model(str(folder), shard=Shard(rank, 2, row_absmax=True))
        assert mine.model.tp_shard == (rank, 2)
        assert not _same_state(mine.model, shard_model(copy.deepcopy(whole.model), rank, 2))
        assert mine.model.num_kv_heads == max(whole.model.num_kv_heads // 2, 1)
        quantize_model(mine.model, int8)  # int8 on the shard: the scales of tp=1's full rows
        assert not _same_int8(mine.model, shard_model(copy.deepcopy(whole_int8), rank, 2))


class Reads:
    """safetensors.safe_open, recording the shape of every tensor it hands out."""

    def __init__(self, real):
        self.real, self.log = real, []

    def __call__(self, *args, **kwargs):
        return _File(self.real(*args, **kwargs), self.log)


class _File:
    def __init__(self, f, log):
        self.f, self.log = f, log

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        self.log.append((key, t.numel()))
        return t

    def get_slice(self, key):
        return _Slice(self.f.get_slice(key), key, self.log)


class _Slice:
    def __init__(self, s, key, log):
        self.s, self.key, self.log = s, key, log

    def get_shape(self):
        return self.s.get_shape()

    def __getitem__(self, index):
        t = self.s[index]
        self.log.append((self.key, t.numel()))
        return t


@pytest.mark.parametrize("row_absmax", [False, True])
def test_a_rank_never_reads_a_whole_split_weight(releases, monkeypatch, row_absmax):
    """MiniCPM-V's sharded safetensors folder at --tp 2: every read of a split decoder weight is at
    most half of it; without int8 scales a rank reads exactly its half, with them (row-parallel
    weights read again in row blocks of half the weight for their absmax) no more than the whole."""
    import safetensors

    folder, whole = releases("minicpmv")
    full = {k: v.numel() for k, v in whole.model.state_dict().items()}
    reads = Reads(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", reads)
    model = load_model(str(folder), shard=Shard(0, 2, row_absmax=row_absmax)).model
    split = [k for k in full if k.startswith("llm.model.layers.") and k.split(".")[-2] in SPLIT]
    assert split and all(k.endswith(".weight") for k in split)
    for key in split:
        sizes = [n for k, n in reads.log if k == key]
        assert sizes and max(sizes) <= full[key] // 2, (key, sizes)
        parallel_rows = key.split(".")[-2] in ("o_proj", "down_proj")
        expected = full[key] // 2 + (full[key] if row_absmax and parallel_rows else 0)
        assert sum(sizes) == expected, (key, sizes)
    replicated = [k for k in full if not k.startswith("llm.model.layers.") or k.split(".")[-2] not in DECODER]
    assert all(sum(n for k, n in reads.log if k == key) == full[key] for key in replicated)
    assert model.tp_shard == (0, 2)


def test_int8_on_a_shard_loaded_without_row_scales_is_refused(releases):
    from vlmrt.quantize import with_weights

    folder, _ = releases("qwen-safetensors")
    loaded = with_weights(load_model(str(folder), shard=Shard(1, 2)), parse_weights("int8"))

    class Rank1:
        rank, world = 1, 2

    with pytest.raises(VlmrtError, match="without its row scales"):
        sharded_runtime(loaded, Rank1)
