"""BERT-style sentiment fine-tuning with Hugging Face transformers (`pip install kubetrain[nlp]`).

Model (`training.options.model`, default `distilbert-base-uncased`): a hub name
or a `file://`/`s3://` directory written by `save_pretrained` (model + tokenizer).
`training.pretrained: true` loads its weights; a `file://`/`s3://` URI loads
weights and tokenizer from that directory instead (offline clusters); `false`
initialises randomly from its config. On `synthetic` data with random weights
and no `options.model`, nothing comes from the hub: a DistilBERT-shaped model
(distilbert-base-uncased's config) over a WordPiece vocabulary of the synthetic
words, so that run is offline like every other task's. A loaded export (trainer.export) takes config
and tokenizer from the same place and its weights from the export, so a model
trained from a `file://` folder loads offline. The classifier head is resized to
`numClasses`.

Data (`training.data.source`):
- `synthetic`: offline, learnable sentences of neutral filler words with
  positive and negative words mixed in; the label is the majority sentiment
  (`numClasses: 2`). SYNTHETIC_WORDS lists the words (for building a tiny vocab).
- `file`: `training.data.path` is a CSV (header row) or JSONL file with `text`
  and `label` fields (label = class index or name; names are sorted into
  indices); `evalPath`, else a 10% hold-out.
- `huggingface`: `training.data.path` is a dataset name (e.g. `stanfordnlp/sst2`),
  loaded with the `datasets` package; options textColumn/labelColumn (text/label),
  evalSplit (`validation`, else `test`).
Batches are tokenized in the collate function and padded to the longest
sequence of the batch (dynamic padding), truncated to `options.maxLength` (128).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainer.errors import UserError
from trainer.tasks import TaskSpec, building, register
from trainer.tasks import _weights

log = logging.getLogger(__name__)

POSITIVE = ("good", "great", "excellent", "wonderful", "love", "enjoyed", "brilliant", "fun")
NEGATIVE = ("bad", "awful", "terrible", "boring", "hate", "poor", "worst", "dull")
FILLER = ("the", "movie", "film", "was", "a", "and", "it", "plot", "acting", "story", "i", "this",
          "really", "quite", "very", "ending", "cast", "scenes", "music", "overall")
SYNTHETIC_WORDS = POSITIVE + NEGATIVE + FILLER


class TextDataset(Dataset):
    deterministic_items = True  # (text, label) lookups; the collate tokenizes without randomness

    def __init__(self, texts: list[str], labels: list[int]):
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int):
        return self.texts[index], self.labels[index]


class DynamicPaddingCollate:
    """Tokenizes a batch of (text, label) and pads to its longest sequence."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items):
        texts, labels = zip(*items)
        inputs = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return dict(inputs), torch.tensor(labels, dtype=torch.long)


def count_tokens(batch) -> torch.Tensor:
    """Real tokens of a padded batch: the attention mask's ones (special tokens included, padding not)."""
    inputs, _ = batch
    return inputs["attention_mask"].sum()


def synthetic_text(num_samples: int, seed: int) -> TextDataset:
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(num_samples):
        label = int(torch.randint(0, 2, (), generator=g))
        strong = int(torch.randint(1, 4, (), generator=g))  # words of the label's sentiment
        weak = int(torch.randint(0, strong, (), generator=g))  # fewer of the other
        pos, neg = (strong, weak) if label else (weak, strong)
        words = ([POSITIVE[int(i)] for i in torch.randint(0, len(POSITIVE), (pos,), generator=g)]
                 + [NEGATIVE[int(i)] for i in torch.randint(0, len(NEGATIVE), (neg,), generator=g)]
                 + [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (int(torch.randint(4, 12, (), generator=g)),),
                                                          generator=g)])
        order = torch.randperm(len(words), generator=g).tolist()
        texts.append(" ".join(words[i] for i in order))
        labels.append(label)
    return TextDataset(texts, labels)


def _label_indices(raw: list, key: str, classes: list[str] | None = None) -> tuple[list[int], list[str] | None]:
    names = sorted({str(v) for v in raw})
    if classes is None and all(n.lstrip("-").isdigit() for n in names):
        return [int(v) for v in raw], None
    classes = classes or names
    unknown = set(names) - set(classes)
    if unknown:
        raise UserError(f"{key}: labels {sorted(unknown)} do not occur in the training data")
    return [classes.index(str(v)) for v in raw], classes


def read_text_file(path: str, key: str, classes: list[str] | None = None) -> tuple[TextDataset, list | None]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: {path!r}: no such file")
    try:
        if p.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            with open(p, newline="") as f:
                rows = list(csv.DictReader(f))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{key}: {path}: {e}") from None
    if not rows or any("text" not in r or "label" not in r for r in rows):
        raise UserError(f"{key}: {path}: every row needs `text` and `label` fields")
    labels, classes = _label_indices([r["label"] for r in rows], key, classes)
    return TextDataset([str(r["text"]) for r in rows], labels), classes


def hf_datasets(name: str, options: dict) -> tuple[TextDataset, TextDataset]:
    try:
        import datasets
    except ImportError:
        raise UserError("training.data.source: huggingface needs the `datasets` package "
                        "(pip install datasets)") from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as e:
        raise UserError(f"training.data.path: cannot load Hugging Face dataset {name!r}: {e}") from None
    text, label = options.get("textColumn", "text"), options.get("labelColumn", "label")
    eval_split = options.get("evalSplit") or ("validation" if "validation" in loaded else "test")

    def split(s):
        if s not in loaded:
            raise UserError(f"training.options.evalSplit: dataset {name!r} has no split {s!r} "
                            f"(has {list(loaded)})")
        return TextDataset(list(loaded[s][text]), [int(v) for v in loaded[s][label]])

    return split("train"), split(eval_split)


def _synthetic_tokenizer(folder: Path):
    """A WordPiece tokenizer whose vocabulary is SYNTHETIC_WORDS, its vocab.txt written in `folder`."""
    import inspect

    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SYNTHETIC_WORDS]) + "\n")
    # transformers 5 names the argument `vocab`; 4.x `vocab_file`
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizer).parameters else "vocab_file"
    return BertTokenizer(**{arg: str(vocab)})


def offline_synthetic(cfg) -> bool:
    """Random weights on synthetic sentences: the hub's tokenizer and config would add nothing but a download."""
    return cfg.pretrained is False and "model" not in cfg.options and cfg.data.source == "synthetic"


def load_model_and_tokenizer(cfg, weights: _weights.WeightsReader | None = None):
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise UserError("training.task: bert-sentiment needs Hugging Face transformers: "
                        "pip install 'kubetrain[nlp]'") from None
    if offline_synthetic(cfg):
        import tempfile

        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        with tempfile.TemporaryDirectory() as folder:
            tokenizer = _synthetic_tokenizer(Path(folder))
        # DistilBertConfig's defaults are distilbert-base-uncased's, but for the vocabulary
        config = DistilBertConfig(vocab_size=len(tokenizer), num_labels=cfg.num_classes)
        return DistilBertForSequenceClassification(config), tokenizer
    source = str(cfg.options.get("model", "distilbert-base-uncased"))
    key = "training.options.model"
    if isinstance(cfg.pretrained, str):
        source, key = cfg.pretrained, "training.pretrained"
    if source.startswith(("file://", "s3://", "hf://")):  # hf://: into the run's weights cache, like causal-lm
        source = str(_weights.current_reader(weights).fetch_directory(source, key))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if cfg.pretrained and building().weights:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=cfg.num_classes, ignore_mismatched_sizes=True)
        else:
            model = AutoModelForSequenceClassification.from_config(
                AutoConfig.from_pretrained(source, num_labels=cfg.num_classes))
    except OSError as e:  # not a hub name and not a model folder, or no internet
        raise UserError(f"{key}: cannot load {source!r} ({e}); offline, point training.pretrained at a "
                        "file:// or s3:// directory written by save_pretrained") from None
    return model, tokenizer


def save_tiny_model(folder: str | Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and a WordPiece tokenizer over
    SYNTHETIC_WORDS, saved like a hub model: an offline stand-in for smoke tests and
    benchmarks (`training.pretrained: file://<folder>`)."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _synthetic_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits_cross_entropy(outputs, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.logits.float(), targets)


@register("bert-sentiment")
def build(cfg, weights: _weights.WeightsReader | None = None) -> TaskSpec:
    data = cfg.data
    if not building().data:
        model, tokenizer = load_model_and_tokenizer(cfg, weights)
        return TaskSpec(model=model, loss_fn=logits_cross_entropy,
                        collate_fn=DynamicPaddingCollate(tokenizer, int(cfg.options.get("maxLength", 128))),
                        count_tokens=count_tokens)
    if data.source == "synthetic":
        if cfg.num_classes != 2:
            raise UserError("training.numClasses must be 2 for bert-sentiment on synthetic data")
        train, test = synthetic_text(data.train_samples, cfg.seed), synthetic_text(data.eval_samples, cfg.seed + 1)
    elif data.source == "file":
        if not data.path:
            raise UserError("training.data.path: set it to a CSV or JSONL file with text,label for source file")
        train, classes = read_text_file(data.path, "training.data.path")
        if data.eval_path:
            test, _ = read_text_file(data.eval_path, "training.data.evalPath", classes)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            cut = max(1, len(order) // 10)
            test = TextDataset([train.texts[i] for i in order[:cut]], [train.labels[i] for i in order[:cut]])
            train = TextDataset([train.texts[i] for i in order[cut:]], [train.labels[i] for i in order[cut:]])
    elif data.source == "huggingface":
        train, test = hf_datasets(data.path, cfg.options)
    else:
        raise UserError(f"training.data.source: {data.source!r} is not supported by bert-sentiment "
                        "(use synthetic, file or huggingface)")
    if max(train.labels) >= cfg.num_classes:
        raise UserError(f"training.numClasses: {cfg.num_classes} is too small for label {max(train.labels)}")
    model, tokenizer = load_model_and_tokenizer(cfg, weights)
    collate = DynamicPaddingCollate(tokenizer, int(cfg.options.get("maxLength", 128)))
    return TaskSpec(model=model, train_dataset=train, eval_dataset=test, loss_fn=logits_cross_entropy,
                    collate_fn=collate, count_tokens=count_tokens)
