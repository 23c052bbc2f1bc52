"""The chart's values.yaml and values.schema.json are what trainer/values_model.py generates."""

import dataclasses
import json
import subprocess
import sys

import pytest

from support import REPO
from trainer import values_codegen, values_model
from trainer.chart import default_values, values_schema
from trainer.config import TrainerConfig, trainer_config_from_values


def test_the_committed_chart_files_are_the_model_s():
    assert values_codegen.differences() == [], "run `python -m trainer.values_codegen` and commit the result"


def test_the_check_names_the_first_differing_key(tmp_path):
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "values.yaml").write_text(values_codegen.values_yaml_text().replace("  batchSize: 64", "  batchSize: 32"))
    schema = values_codegen.values_schema()
    schema["properties"]["job"]["properties"]["nodes"]["maximum"] = 8
    (chart / "values.schema.json").write_text(json.dumps(schema, indent=2))
    found = values_codegen.differences(chart)
    assert found[0].startswith("values.yaml differs first at key training.batchSize"), found
    assert "'  batchSize: 32'" in found[0] and "'  batchSize: 64'" in found[0]
    assert found[1] == "values.schema.json differs first at key job.nodes (maximum): committed 8, generated 1024"

    schema = values_codegen.values_schema()
    del schema["properties"]["training"]["properties"]["tensorboard"]["properties"]["syncSeconds"]
    (chart / "values.schema.json").write_text(json.dumps(schema, indent=2))
    assert values_codegen.differences(chart)[1] == (
        "values.schema.json differs first at key training.tensorboard.syncSeconds: generated only")


def test_the_tool_s_check_command_exits_1_on_a_stale_file(tmp_path, monkeypatch):
    """`python -m trainer.values_codegen --check` is what a developer runs: exit 0 on main."""
    result = subprocess.run([sys.executable, "-m", "trainer.values_codegen", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(values_codegen, "CHART", tmp_path)
    (tmp_path / "values.yaml").write_text("image: {}\n")
    (tmp_path / "values.schema.json").write_text("{}\n")
    assert values_codegen.main(["--check"]) == 1


def _keys(schema: dict, path: str = ""):
    for name, prop in schema.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        yield key, prop
        yield from _keys(prop, key)


def test_every_schema_key_has_a_description_that_starts_with_its_name():
    keys = dict(_keys(values_schema()))
    assert len(keys) > 140
    for key, prop in keys.items():
        assert prop.get("description", "").startswith(f"{key} "), key


def test_every_values_key_has_a_comment_starting_with_its_name():
    lines = (REPO / "helm" / "kubetrain" / "values.yaml").read_text().splitlines()
    keyed = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith(("#", "-"))]
    for i in keyed:
        key = values_codegen._yaml_key_at(lines, i)
        assert lines[i - 1].strip().startswith(f"# {key} "), (key, lines[i - 1])


def test_the_trainer_s_config_types_are_the_model_s_and_its_defaults_the_chart_s():
    hints = {f.name: f.type for f in dataclasses.fields(TrainerConfig)}
    assert hints["training"] in ("TrainingConfig", values_model.TrainingConfig)
    config = trainer_config_from_values("x", default_values())
    assert config.training == dataclasses.replace(values_model.TrainingConfig(), num_classes=10)
    assert config.checkpoint == values_model.CheckpointConfig()
    assert config.s3 == values_model.S3Config() and config.metrics == values_model.MetricsConfig()
    assert "dev_secret" not in config.as_dict()["s3"], "chart-only settings stay out of the trainer's config"


@pytest.mark.parametrize("task", sorted(values_model.TASK_RULES))
def test_a_task_s_head_size_default_is_its_rule_s(task):
    values = json.loads(json.dumps(default_values()))
    values["training"]["task"] = task
    if task == "custom":
        values["training"]["entrypoint"] = "pkg.mod:fn"
    config = trainer_config_from_values("x", values)
    assert config.training.num_classes == values_model.TASK_RULES[task].num_classes
