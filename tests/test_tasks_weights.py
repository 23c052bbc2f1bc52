"""training.pretrained from file:// and s3:// (a real S3-compatible server process)."""

from __future__ import annotations

import pytest
import torch

from fixtures.tasks_helpers import resnet_weights_uri, tiny_bert_dir
from s3server import CREDENTIALS
from trainer.config import S3Config
from trainer.errors import UserError
from trainer.tasks import _weights
from trainer.tasks.resnet18_finetune import build_model


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket("weights")
    return s3_server


@pytest.fixture
def s3_weights(s3, monkeypatch):
    for key, value in {**CREDENTIALS, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    _weights.configure(S3Config(endpoint=s3.endpoint, region="us-east-1", addressing_style="path",
                                credentials_secret=""))
    yield s3
    _weights.configure(None)


def test_resnet_weights_from_s3_replace_the_imagenet_head(tmp_path, s3_weights):
    local = resnet_weights_uri(tmp_path).removeprefix("file://")
    s3_weights.client().upload_file(local, "weights", "models/resnet18.pt")
    model = build_model(num_classes=5, pretrained="s3://weights/models/resnet18.pt")
    saved = torch.load(local, weights_only=True)
    assert torch.equal(model.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert torch.equal(model.bn1.running_var, saved["bn1.running_var"])
    assert model.fc.out_features == 5


def test_missing_weights_object_is_a_user_error_naming_the_key(s3_weights):
    with pytest.raises(UserError, match="training.pretrained: cannot read 's3://weights/nope.pt'"):
        build_model(num_classes=5, pretrained="s3://weights/nope.pt")


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

    model, tokenizer = load_model_and_tokenizer(Cfg)
    assert model.config.num_labels == 3 and model.config.hidden_size == 32
    assert tokenizer("good film")["input_ids"][1] == tokenizer.convert_tokens_to_ids("good")
