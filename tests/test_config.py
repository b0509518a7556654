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


def test_every_problem_of_a_config_is_reported_at_once():
    # Before: one problem per run (the first field that broke), so a file with three
    # mistakes took three runs to fix.
    from loramoe.train import TrainConfig, TrainConfigError

    with pytest.raises(TrainConfigError) as raised:
        TrainConfig.from_dict({"model": "m", "train_file": "t", "output_dir": "o",
                               "batch_sizee": 3, "lr": "fast", "warmup_ratio": 2,
                               "loramoe": {"lbc_beta": -1, "rank": 0}})
    text = str(raised.value)
    assert text.startswith("5 problems:\n")
    assert "unknown field(s) ['batch_sizee'] (did you mean 'batch_size' for 'batch_sizee'?)" \
        in text
    for line in ["- TrainConfig.lr: must be a finite number or unset, got 'fast' (str)",
                 "- TrainConfig.warmup_ratio: must be in [0, 1), got 2",
                 "- TrainConfig.loramoe: LoRAMoEConfig.rank: must be an integer >= 1, got 0",
                 "- TrainConfig.loramoe: LoRAMoEConfig.lbc_beta: must be >= 0"]:
        assert line in text
    assert len(raised.value.problems) == 5


def test_a_single_problem_reads_as_before():
    with pytest.raises(ConfigError) as raised:
        LoRAMoEConfig(rank=0)
    assert str(raised.value) == "LoRAMoEConfig.rank: must be an integer >= 1, got 0"


def test_a_nested_table_of_the_wrong_kind_is_named_not_a_traceback():
    # Before: AttributeError: 'str' object has no attribute 'type_names'
    from loramoe.train import TrainConfig, TrainConfigError

    with pytest.raises(TrainConfigError, match=r"^TrainConfig\.loramoe: must be a table of "
                       r"LoRAMoEConfig fields, got 'x' \(str\)$"):
        TrainConfig.from_dict({"model": "m", "train_file": "t", "output_dir": "o",
                               "loramoe": "x"})


def test_every_method_and_task_of_a_pipeline_config_is_reported_at_once():
    from loramoe.pipeline import PipelineConfig
    from loramoe.pipeline.config import PipelineConfigError

    data = tomllib.loads((CONFIGS / "smoke.toml").read_text())
    data["methods"]["sft"]["lr"] = -1
    data["methods"]["loramoe"]["loramoe"] = {"lbc_form": "other"}
    data["retry_times"] = -1
    with pytest.raises(PipelineConfigError) as raised:
        PipelineConfig.from_dict(data, base_dir=CONFIGS)
    assert raised.value.problems == [
        "config.methods.sft: TrainConfig.lr: must be > 0 (or unset for the method default), "
        "got -1",
        "config.methods.loramoe: TrainConfig.loramoe: LoRAMoEConfig.lbc_form: must be 'paper' "
        "or 'aligned', got 'other'",
        "config.retry_times: must be >= 0, got -1"]
    data = tomllib.loads((CONFIGS / "smoke.toml").read_text())
    data["mixture"]["tasks"][0]["weight"] = 0
    data["mixture"]["tasks"][1]["eval_size"] = 0
    data["mixture"]["eval_size"] = 0
    data["eval_batch_size"] = 0
    with pytest.raises(PipelineConfigError) as raised:
        PipelineConfig.from_dict(data, base_dir=CONFIGS)
    assert raised.value.problems == [
        "config.mixture: tasks['country_capital'].weight: must be > 0, got 0",
        "config.mixture: tasks['element_symbol'].eval_size: must be None or >= 1, got 0",
        "config.mixture: mixture.eval_size: must be >= 1, got 0",
        "config.eval_batch_size: must be >= 1, got 0"]


def test_a_rule_that_breaks_on_its_own_is_not_hidden():
    # a rule may be skipped only when another field's problem explains why it failed
    from dataclasses import dataclass

    from loramoe.fields import check_fields

    @dataclass
    class Probe:
        x: int = 1

    with pytest.raises(ZeroDivisionError):
        check_fields(Probe(), [("x", lambda v: v / 0 > 0, "anything")], ValueError)


def test_the_methods_checks_against_each_other_report_every_problem():
    # Before: the first of these stopped the config (task types, model folders, a shared
    # model), so fixing one showed the next.
    from loramoe.pipeline import PipelineConfig
    from loramoe.pipeline.config import PipelineConfigError

    data = tomllib.loads((CONFIGS / "smoke.toml").read_text())
    data["mixture"]["task_types"] = ["knowledge", "downstream", "chat"]
    data["methods"]["sft"]["model"] = "./no-such-folder"
    with pytest.raises(PipelineConfigError) as raised:
        PipelineConfig.from_dict(data, base_dir=CONFIGS)
    problems = raised.value.problems
    assert len(problems) == 3, problems  # in the methods' order, then the shared fields
    assert problems[0].startswith("config.methods.sft.model: model './no-such-folder': no "
                                  "such folder")
    assert problems[1].startswith("config.mixture.task_types ['knowledge', 'downstream', "
                                  "'chat'] has ['chat'], which config.methods.loramoe")
    assert problems[2].startswith("config.methods: every method must share train.model")
