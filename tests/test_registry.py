import pytest
import torch

from families import FAMILY_TESTS
from vlmrt.models import FAMILIES, all_presets, family_class, load_model
from vlmrt.errors import VlmrtError


def test_every_family_has_a_test_entry():
    assert set(FAMILIES) == set(FAMILY_TESTS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_preset_builds_and_runs_each_stage(family):
    from conftest import load_tiny
    from vlmrt.generate import split_embedded
    from vlmrt.kv_cache import StaticKVCache
    from vlmrt.models.layers import LlamaForCausalLM

    loaded = load_tiny(FAMILY_TESTS[family]["tiny"])
    m, spec = loaded.model, loaded.spec
    pixels = torch.zeros(1, 3, spec.image_size, spec.image_size)
    feats = m.encode_images(pixels)  # a tensor, or a dict of named outputs (e.g. SliMM's deepstack_features)
    main = feats["image_features"] if isinstance(feats, dict) else feats
    assert main.shape[:2] == (1, spec.num_image_tokens) and torch.isfinite(main).all()
    ids = torch.tensor([[1] + [spec.image_token_id] * spec.num_image_tokens + [5, 6]])
    embeds, extras = split_embedded(m.embed(ids, feats))  # extras go to the decoder by name
    cache = StaticKVCache(m.num_layers, 1, m.num_kv_heads, 64, m.head_dim, torch.float32, "cpu")
    t = ids.shape[1]
    mask = torch.zeros(1, 64, dtype=torch.long)
    mask[:, :t] = 1
    logits = m.decode(embeds, torch.arange(t)[None], mask, torch.arange(t), cache, **extras)
    vocab = next(mod for mod in m.modules() if isinstance(mod, LlamaForCausalLM)).config.vocab_size
    assert logits.shape == (1, t, vocab)
    assert torch.isfinite(logits).all()
    # runtimes ask for the last position only: the same numbers, without the other T-1 rows
    last = m.decode(embeds, torch.arange(t)[None], mask, torch.arange(t), cache, logits_at=torch.tensor([t - 1]), **extras)
    assert last.shape[:2] == (1, 1)
    torch.testing.assert_close(last, logits[:, -1:], rtol=1e-5, atol=1e-5)


def test_every_preset_is_constructible_on_meta():
    for name, (family, cfg) in all_presets().items():
        with torch.device("meta"):
            model = family_class(family)(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0, name


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(VlmrtError, match="minigpt4-tiny"):
        load_model("no-such-model")


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(VlmrtError, match="supported: .*minigpt4"):
        family_class("llava")
