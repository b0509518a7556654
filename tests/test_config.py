"""LoRAMoEConfig validates every field with a message that names it."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from loramoe import ConfigError, LoRAMoEConfig


def test_paper_defaults():
    config = LoRAMoEConfig()
    assert (config.num_experts, config.rank, config.alpha, config.dropout) == (6, 4, 32.0, 0.05)
    assert config.expert_types == {"knowledge": 3, "downstream": 3}
    assert (config.lbc_delta, config.lbc_beta, config.top_k) == (0.1, 0.1, None)
    assert config.scaling == 8.0
    assert config.expert_type_ids() == [0, 0, 0, 1, 1, 1]
    assert config.type_index("downstream") == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"expert_types": ["knowledge", "downstream"]}, "expert_types"),
        ({"expert_types": {}}, "expert_types"),
        ({"expert_types": {"knowledge": 6, "downstream": 0}}, "expert_types"),
        ({"lbc_delta": 1.5}, "lbc_delta"),
        ({"lbc_delta": -0.1}, "lbc_delta"),
        ({"lbc_beta": -1}, "lbc_beta"),
        ({"top_k": 7}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"LoRAMoEConfig\.{field}:"):
        LoRAMoEConfig(**kwargs)


def test_num_experts_is_derived_once_from_expert_types():
    config = LoRAMoEConfig(expert_types={"knowledge": 3, "downstream": 2})
    assert config.num_experts == 5 and "num_experts" not in config.to_dict()
    # An adapter written by 0.1.0 still carries the key: accepted when it agrees ...
    assert LoRAMoEConfig.from_dict({**config.to_dict(), "num_experts": 5}) == config
    # ... and named when it does not.
    with pytest.raises(ConfigError, match=r"num_experts: 6 disagrees with expert_types"):
        LoRAMoEConfig.from_dict({**config.to_dict(), "num_experts": 6})


def test_any_number_of_types_and_round_trip():
    config = LoRAMoEConfig(expert_types={"a": 1, "b": 2, "c": 2}, top_k=2,
                           target_modules="up_proj")
    assert config.num_experts == 5
    assert config.expert_type_ids() == [0, 1, 1, 2, 2]
    assert config.target_modules == ["up_proj"]
    assert LoRAMoEConfig.from_dict(config.to_dict()) == config


def test_unknown_fields_and_types_are_named():
    with pytest.raises(ConfigError, match="unknown field.*'experts'"):
        LoRAMoEConfig.from_dict({"experts": 4})
    with pytest.raises(ConfigError, match="'math' is not one of expert_types"):
        LoRAMoEConfig().type_index("math")


CONFIGS = Path(__file__).resolve().parents[1] / "flows" / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_preset_parses_and_gives_each_branch_a_valid_train_config(preset):
    """A typo in a preset (a field, a method's LoRAMoE override) fails here, not an hour into
    its run."""
    from loramoe.pipeline import PipelineConfig

    config = PipelineConfig.from_dict(tomllib.loads((CONFIGS / preset).read_text()),
                                      base_dir=CONFIGS)
    branches = config.branches()
    assert branches
    for branch in branches:
        train = config.train_config(branch, Path("train.jsonl"), Path("out"))
        assert train.method in ("sft", "lora", "loramoe")
