"""PackedLinears: the packed inference matmul equals the separate linears, survives dtype
conversion, falls back when a weight is replaced, and leaves training and the state dict alone."""

import torch
from torch import nn

from nimblelm.layers.packing import PackedLinears, RepacksOnConversion
from nimblelm.models.config import ModelConfig
from nimblelm.models.lm import LanguageModel


class Pair(RepacksOnConversion, nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12, bias=True)
        self.b = nn.Linear(8, 5, bias=False)
        self.packed = PackedLinears(self.a, self.b)


def separate(module, x):
    return [module.a(x), module.b(x)]


def test_packed_matmul_equals_the_separate_linears_and_adds_no_parameters():
    torch.manual_seed(0)
    module = Pair().double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert module.packed.usable()
        packed, ref = module.packed(x), separate(module, x)
    for got, want in zip(packed, ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert sorted(module.state_dict()) == ["a.bias", "a.weight", "b.weight"]
    assert module.a.weight.shape == (12, 8) and module.a.weight.data_ptr() == module.packed.matrix.data_ptr()


def test_conversion_repacks_and_in_place_updates_reach_the_packed_matrix():
    module = Pair()
    module.double()  # every weight gets new storage; the mixin re-points them into a new pack
    assert module.packed.matrix.dtype == torch.float64
    with torch.no_grad():
        assert module.packed.usable()
        module.b.weight.fill_(0.5)  # an in-place update (optimizer step, load_state_dict) lands in the pack
        x = torch.randn(2, 8, dtype=torch.float64)
        torch.testing.assert_close(module.packed(x)[1], module.b(x))


def test_a_deep_copy_packs_its_own_weights():
    import copy

    module = Pair()
    clone = copy.deepcopy(module)
    with torch.no_grad():
        clone.a.weight.add_(1.0)  # the copy is independent of the original ...
        assert clone.packed.usable() and module.packed.usable()  # ... and both keep the fast path
        x = torch.randn(2, 8)
        torch.testing.assert_close(clone.packed(x)[0], clone.a(x))
        torch.testing.assert_close(module.packed(x)[0], module.a(x))


def test_a_replaced_weight_makes_the_pack_fall_back_to_the_linears():
    module = Pair()
    module.a.weight = nn.Parameter(torch.randn(12, 8))
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert not module.packed.usable()
        torch.testing.assert_close(module.packed(x)[0], module.a(x), rtol=0, atol=0)


def test_training_uses_the_linears_so_gradients_reach_every_parameter():
    module = Pair()
    x = torch.randn(2, 8)
    assert not module.packed.usable()  # grad enabled and weights require grad
    sum(y.sum() for y in module.packed(x)).backward()
    assert module.a.weight.grad is not None and module.b.weight.grad is not None


def test_model_round_trips_state_dict_into_packed_weights(tmp_path):
    config = ModelConfig.from_preset("gated-attention-tiny")
    torch.manual_seed(1)
    model = LanguageModel(config).eval()
    model.save(str(tmp_path))
    import nimblelm as nl

    loaded = nl.load(str(tmp_path)).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    attn = loaded.blocks[0].mixer
    assert attn._input_projections.usable() is False  # grad mode on outside no_grad
    with torch.no_grad():
        assert attn._input_projections.usable()
