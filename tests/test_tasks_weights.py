"""training.pretrained from file:// and s3:// (a real S3-compatible server process)."""

from __future__ import annotations

import pytest
import torch

from fixtures.tasks_helpers import resnet_weights_uri, tiny_bert_dir
from s3server import CREDENTIALS
from trainer.config import S3Config
from trainer.errors import UserError
from trainer.tasks._weights import WeightsReader
from trainer.tasks.resnet18_finetune import build_model


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket("weights")
    return s3_server


@pytest.fixture
def s3_weights(s3, monkeypatch):
    for key, value in {**CREDENTIALS, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    s3.reader = WeightsReader(S3Config(endpoint=s3.endpoint, region="us-east-1", addressing_style="path",
                                       credentials_secret=""))
    return s3


def test_resnet_weights_from_s3_replace_the_imagenet_head(tmp_path, s3_weights):
    local = resnet_weights_uri(tmp_path).removeprefix("file://")
    s3_weights.client().upload_file(local, "weights", "models/resnet18.pt")
    model = build_model(num_classes=5, pretrained="s3://weights/models/resnet18.pt", weights=s3_weights.reader)
    saved = torch.load(local, weights_only=True)
    assert torch.equal(model.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert torch.equal(model.bn1.running_var, saved["bn1.running_var"])
    assert model.fc.out_features == 5


def test_missing_weights_object_is_a_user_error_naming_the_key(s3_weights):
    with pytest.raises(UserError, match="training.pretrained: cannot read 's3://weights/nope.pt'"):
        build_model(num_classes=5, pretrained="s3://weights/nope.pt", weights=s3_weights.reader)


def test_a_file_that_is_not_a_resnet_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="not a ResNet-18 state dict"):
        build_model(num_classes=5, pretrained=path.as_uri())


def test_bert_folder_from_s3(tmp_path, s3_weights):
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra")
    from trainer.tasks.bert_sentiment import load_model_and_tokenizer

    folder = tiny_bert_dir(tmp_path)
    for file in folder.iterdir():
        s3_weights.client().upload_file(str(file), "weights", f"hub/tiny-bert/{file.name}")

    class Cfg:  # the fields load_model_and_tokenizer reads
        pretrained, num_classes, options = "s3://weights/hub/tiny-bert", 3, {}

    model, tokenizer = load_model_and_tokenizer(Cfg, s3_weights.reader)
    assert model.config.num_labels == 3 and model.config.hidden_size == 32
    assert tokenizer("good film")["input_ids"][1] == tokenizer.convert_tokens_to_ids("good")


ENTRY_POINT_LOADING_ITSELF = '''
import torch
from trainer.tasks import load_pretrained

def build(cfg):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    load_pretrained(model[0], cfg.pretrained)  # only the first layer, no S3 settings passed
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    return {"model": model, "train_dataset": data}
'''


def test_a_custom_entry_point_s_own_load_reads_s3_with_the_run_s_settings(tmp_path, s3_weights):
    """The run's reader is passed to the builder; load_pretrained() called inside the entry point,
    without S3 settings of its own, reads through it (here: a non-AWS endpoint), and the loop does
    not load the file a second time over the whole model."""
    import dataclasses

    from trainer.chart import default_values
    from trainer.config import trainer_config_from_values
    from trainer.tasks import get_task

    (tmp_path / "own_load.py").write_text(ENTRY_POINT_LOADING_ITSELF)
    layer = torch.nn.Linear(4, 8)
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    s3_weights.client().upload_file(str(tmp_path / "layer.pt"), "weights", "models/layer.pt")
    training = trainer_config_from_values("x", default_values()).training
    cfg = dataclasses.replace(training, task="custom", entrypoint="own_load:build", python_path=(str(tmp_path),),
                              pretrained="s3://weights/models/layer.pt")
    spec = get_task("custom")(cfg, weights=s3_weights.reader)
    assert torch.equal(spec.model[0].weight, layer.weight)
    assert s3_weights.reader.applied == {"s3://weights/models/layer.pt"}
    # Outside a run, a script passes the S3 settings itself.
    from trainer.tasks import load_pretrained

    other = torch.nn.Linear(4, 8)
    assert load_pretrained(other, "s3://weights/models/layer.pt", s3=s3_weights.reader.s3_config)["loaded"]
    assert torch.equal(other.weight, layer.weight)
