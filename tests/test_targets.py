"""The block map: groups, proportional 9B bands, layer kinds, presets, and the empty-selection error."""
import pytest
from klein_lora_studio.trainer.model import targets as tg

K4B = tg.BlockCounts(5, 20)
K9B = tg.BlockCounts(8, 24)


def test_4b_groups_follow_the_workshop_numbering():
    numbers = tg.global_numbers(K4B)
    assert numbers["double"] == [0, 1, 2, 3, 4]
    assert numbers["single_early"] == list(range(5, 11))
    assert numbers["single_mid"] == list(range(11, 19))
    assert numbers["single_late"] == list(range(19, 25))


def test_9b_single_bands_keep_4b_proportions():
    bands = tg.single_bands(24)
    assert (len(bands["single_early"]), len(bands["single_mid"]), len(bands["single_late"])) == (7, 10, 7)
    assert tg.global_numbers(K9B)["single_late"] == list(range(25, 32))
    covered = sorted(i for r in bands.values() for i in r)
    assert covered == list(range(24))


def test_attention_layers_are_exact_module_names():
    t = tg.resolve_targets(["double", "single_late"], "attention", K4B)
    assert "double_blocks.0.img_attn.qkv" in t.modules and "double_blocks.4.txt_attn.proj" in t.modules
    assert "double_blocks.0.img_mlp.0" not in t.modules
    assert "single_blocks.19.linear1" in t.modules and "single_blocks.14.linear2" in t.modules
    assert "single_blocks.13.linear1" not in t.modules
    assert len(t.modules) == 5 * 4 + 6 * 2


def test_attention_mlp_adds_double_block_mlps_and_streams_filter():
    t = tg.resolve_targets(["double"], "attention_mlp", K4B, streams="text")
    assert t.modules[:4] == ["double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                             "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2"]
    assert not any("img_" in m for m in t.modules)


def test_all_linears_uses_the_models_real_linears():
    names = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_extra", "single_blocks.0.linear1", "img_in"}
    t = tg.resolve_targets(["double"], "all_linears", tg.BlockCounts(1, 1), linear_names=names)
    assert t.modules == ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_extra"]


def test_empty_selection_is_an_error():
    with pytest.raises(ValueError, match="No block group selected"):
        tg.resolve_targets([], "attention", K4B)


def test_names_missing_from_the_model_are_an_error():
    with pytest.raises(ValueError, match="do not exist in the connected model"):
        tg.resolve_targets(["double"], "attention", K4B, linear_names={"img_in"})


@pytest.mark.parametrize("preset", list(tg.PRESETS))
def test_every_preset_resolves_on_4b_and_9b(preset):
    p = tg.PRESETS[preset]
    for counts in (K4B, K9B):
        t = tg.resolve_targets(p.groups, p.layers, counts, p.streams)
        assert len(t.modules) == len(set(t.modules)) > 0
