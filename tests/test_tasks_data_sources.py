"""Real-data readers on small files written by the tests: WAV folders, CSV and JSONL text."""

from __future__ import annotations

import json
import math
import struct
import wave

import pytest
import torch

from fixtures.tasks_helpers import in_process_trainer
from trainer.errors import UserError


def write_wav(path, freq: float, rate: int, seconds: float, channels: int = 1) -> None:
    n = int(rate * seconds)
    frames = b"".join(struct.pack("<" + "h" * channels, *[int(12000 * math.sin(2 * math.pi * freq * i / rate))] * channels)
                      for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)


def test_speech_folder_reads_wavs_resamples_and_names_classes(tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    rows = ["file,label"]
    for i in range(10):
        name, label = f"clip{i}.wav", ("yes", "no")[i % 2]
        # mixed sample rates, stereo and lengths: all become mono 8 kHz, 0.5 s
        write_wav(folder / name, 440 if label == "yes" else 1500, rate=(8000, 16000)[i % 3 == 0],
                  seconds=0.3 + 0.05 * i, channels=1 + i % 2)
        rows.append(f"{name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    trainer = in_process_trainer(tmp_path, {
        "task": "speech-conv1d", "numClasses": 2, "batchSize": 3, "maxSteps": 2,
        "data": {"source": "folder", "path": str(folder)},
        "options": {"sampleRate": 8000, "seconds": 0.5, "channels": 16, "blocks": 2},
    })
    features, label = trainer.spec.train_dataset[0]
    assert features.shape == (40, 51) and features.dtype == torch.float32  # 40 mels x (0.5 s / 10 ms + 1)
    assert len(trainer.spec.train_dataset) == 9 and len(trainer.spec.eval_dataset) == 1  # 10% held out
    assert trainer.fit()["steps"] == 2


def test_speech_folder_without_labels_file_names_the_key(tmp_path):
    with pytest.raises(UserError, match="training.data.path: .*labels.csv not found"):
        in_process_trainer(tmp_path, {"task": "speech-conv1d", "data": {"source": "folder", "path": str(tmp_path)}})


def test_text_files_csv_and_jsonl_with_named_labels(tmp_path):
    pytest.importorskip("transformers", reason="bert-sentiment needs the nlp extra")
    from fixtures.tasks_helpers import tiny_bert_dir

    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f'"good film, {i}",pos\n"bad film {i}",neg\n' for i in range(10)))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                                  for t, l in [("great", "pos"), ("awful", "neg")]))
    trainer = in_process_trainer(tmp_path, {
        "task": "bert-sentiment", "numClasses": 2, "batchSize": 4, "maxSteps": 2,
        "pretrained": tiny_bert_dir(tmp_path).as_uri(),
        "data": {"source": "file", "path": str(train), "evalPath": str(evaluation)},
    })
    assert trainer.spec.train_dataset[0] == ("good film, 0", 1)  # names sorted: neg=0, pos=1
    assert trainer.spec.eval_dataset.labels == [1, 0]
    inputs, labels = next(iter(trainer.train_loader))
    assert inputs["input_ids"].shape[0] == 4 and inputs["attention_mask"].shape == inputs["input_ids"].shape
    assert trainer.fit()["steps"] == 2
