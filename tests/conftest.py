import pytest
import torch

import nimblelm as nl

# Test models are tiny: OpenMP synchronisation costs more than a second thread gains (and
# stalls badly when anything else runs on the machine), so the suite runs single-threaded.
torch.set_num_threads(1)


def tiny_presets() -> list[str]:
    return [name for name in nl.preset_names() if name.endswith("-tiny")]


def build(preset: str, dtype=torch.float64, seed: int = 0, **overrides) -> nl.LanguageModel:
    """A randomly initialised model of a preset; weights scaled up so logits are not flat."""
    torch.manual_seed(seed)
    model = nl.LanguageModel(nl.ModelConfig.from_preset(preset, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)  # std 0.1: sharper, more varied predictions than std 0.02
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
