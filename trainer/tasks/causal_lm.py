"""Fine-tune a Hugging Face causal LM (any AutoModelForCausalLM architecture): full or LoRA.

`training.pretrained` is a save_pretrained folder (config.json, *.safetensors with or without
an index, tokenizer files): `file://`, `s3://` (read with the run's s3.* settings, fetched
once per node into a cache folder) or `hf://org/name[@revision]` (the hub, where the cluster
has internet). The model is built without weights and each process reads only the part it
holds (trainer/tasks/_llm_model.py); `training.finetune.method: lora` adds peft adapters.

Data (`training.data.source`): `file` reads `training.data.path` (and `evalPath`, else a
seeded 10% hold-out) as JSONL or Parquet, local or s3://, in the chat, prompt/completion or
text format (trainer/tasks/_llm_data.py); `synthetic` is an offline instruction task (name
the number after a given one), its eval rows drawn with another seed.
Options (`training.options`): maxSeqLength, packing, trainOnPrompt, evalPrompts (4) and
maxNewTokens (16), for the greedy answers logged at each evaluation.

Evaluation reports the token-weighted loss (perplexity = exp of it) and, as accuracy, the
share of answer tokens predicted exactly. The export is a merged Hugging Face folder (and,
for LoRA, the adapter folder beside it) that transformers and vLLM load.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.errors import UserError
from trainer.tasks import TaskSpec, register
from trainer.tasks import _llm_data as data
from trainer.tasks import _llm_model as llm
from trainer.tasks import _weights

log = logging.getLogger(__name__)


def causal_lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens that carry a label."""
    logits = outputs.logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=data.IGNORE)


def label_counts(outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer tokens, those predicted exactly): the weights of the eval loss and its accuracy."""
    targets = labels[:, 1:]
    keep = targets != data.IGNORE
    correct = (outputs.logits[:, :-1].argmax(-1) == targets) & keep
    return keep.sum(), correct.sum()


def _datasets(cfg, tokenizer, fetch):
    options, source = cfg.options, cfg.data.source
    max_length = options.get("maxSeqLength") or getattr(tokenizer, "model_max_length", None)
    if not max_length or max_length > 1_000_000:  # tokenizers without a limit say 1e30
        max_length = 2048
    if source == "synthetic":
        chat = bool(getattr(tokenizer, "chat_template", None))
        train_rows = data.synthetic_rows(cfg.data.train_samples, cfg.seed, chat)
        eval_rows = data.synthetic_rows(cfg.data.eval_samples, cfg.seed + 1, chat)  # other draws
        fmt = "chat" if chat else "prompt-completion"
    elif source == "file":
        train_rows = data.read_rows(cfg.data.path, "training.data.path", fetch)
        fmt = data.detect_format(train_rows, "training.data.path")
        if cfg.data.eval_path:
            eval_rows = data.read_rows(cfg.data.eval_path, "training.data.evalPath", fetch)
            if data.detect_format(eval_rows, "training.data.evalPath") != fmt:
                raise UserError(f"training.data.evalPath: its rows are not in the {fmt} format of "
                                "training.data.path")
        else:
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            cut = max(1, len(order) // 10)
            eval_rows, train_rows = [train_rows[i] for i in order[:cut]], [train_rows[i] for i in order[cut:]]
    else:
        raise UserError(f"training.data.source: {source!r} is not supported by causal-lm (use synthetic or file)")
    tokenize = data.Tokenize(tokenizer, fmt, max_length, bool(options.get("trainOnPrompt")), "training.data.path")
    train, evaluation = data.tokenize_rows(train_rows, tokenize), data.tokenize_rows(eval_rows, tokenize)
    if not train:
        raise UserError("training.data.path: no row has a token to learn from")
    packing = bool(options.get("packing"))
    log.info("causal-lm data: %s format (%s), %d training and %d eval examples, max %d tokens%s; %d rows "
             "truncated to maxSeqLength", fmt, source, len(train), len(evaluation), max_length,
             ", packed" if packing else "", tokenize.truncated)
    pad = tokenizer.pad_token_id
    train_set = data.pack(train, max_length, pad, cfg.seed) if packing else data.TokenDataset(train)
    eval_set = data.pack(evaluation, max_length, pad, cfg.seed) if packing else data.TokenDataset(evaluation)
    if packing:
        log.info("packing: %d examples into %d sequences of %d tokens", len(train), len(train_set), max_length)
    return train_set, eval_set, eval_rows, fmt


class Generations:
    """Greedy answers to a few fixed eval prompts, for the log and TensorBoard at each evaluation.
    Under FSDP every rank must run the same forwards: synced_gpus keeps them in step."""

    def __init__(self, tokenizer, rows: list[dict], fmt: str, count: int, max_new_tokens: int):
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.prompts = []  # (token ids, the prompt as shown, the expected answer), encoded once
        for prompt, expected in (data.prompt_of(row, fmt) for row in rows[:count]):
            text = (tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                    if fmt == "chat" else prompt)
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            self.prompts.append((tokenizer(text, add_special_tokens=False)["input_ids"], shown, expected))

    @torch.no_grad()
    def __call__(self, model, device: torch.device, synced: bool) -> list[dict]:
        out = []
        for prompt_ids, shown, expected in self.prompts:
            ids = torch.tensor([prompt_ids], device=device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=self.max_new_tokens, use_cache=True, synced_gpus=synced,
                                       pad_token_id=self.tokenizer.pad_token_id)
            answer = self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
            out.append({"prompt": shown, "answer": answer, "expected": expected})
        return out


class HuggingFaceExport:
    """Rank 0, at the end: the gathered state into a merged save_pretrained folder (and the adapter)."""

    def __init__(self, folder: Path, uri: str, tokenizer, lora):
        self.folder, self.uri, self.tokenizer, self.lora = folder, uri, tokenizer, lora

    def __call__(self, state: dict[str, torch.Tensor], out: Path) -> dict[str, Path]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars in a pod log help no one
        model = llm.build_skeleton(self.folder, self.uri)
        dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        if self.lora is not None:
            model = llm.add_lora(model, self.lora)
        model.load_state_dict(state, strict=False, assign=True)
        (model.get_base_model() if self.lora is not None else model).tie_weights()  # assign untied them
        folders = {}
        if self.lora is not None:
            folders["adapter"] = out / "adapter"
            model.peft_config["default"].base_model_name_or_path = self.uri
            model.save_pretrained(str(folders["adapter"]), save_embedding_layers=False)
            model = model.merge_and_unload()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            model = model.to(dtype)  # the folder's own precision, as vLLM expects it
        folders["model"] = out / "model"
        model.save_pretrained(str(folders["model"]), max_shard_size="2GB")
        self.tokenizer.save_pretrained(str(folders["model"]))
        return folders


# ------------------------------------------------------------------ an offline stand-in model
SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# As real templates do, the generation prompt ends on a special token: a trailing space would be a token
# of its own there, while training text glues it to the reply's first word.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_tiny_tokenizer(folder: Path, chat_template: bool = True):
    """A byte-level BPE tokenizer (as Llama 3 and Qwen2 use) trained on the synthetic task's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(data.SYNTHETIC_WORDS), "answer : the a of to is in that it was for on are with as"]
    corpus += [r["prompt"] + r["completion"] for r in data.synthetic_rows(300, 0, chat=False)]
    corpus += list(data.SYNTHETIC_WORDS) * 3  # words without a space before them, as a chat turn starts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def save_tiny_model(folder: str | Path, arch: str = "llama", hidden: int = 64, layers: int = 2,
                    chat_template: bool = True, shard_size: str = "60KB", seed: int = 0,
                    intermediate: int | None = None, init_range: float = 0.3) -> Path:
    """A tiny random Llama- or Qwen2-shaped model saved as the hub ships one (config, safetensors shards
    and their index, a tokenizer with a chat template): an offline stand-in for smoke tests, docs and
    benchmarks. Weights are drawn at `init_range` rather than transformers' 0.02, so that a frozen random
    base still leaves LoRA adapters a head strong enough to learn the synthetic task."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = train_tiny_tokenizer(folder, chat_template)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, initializer_range=init_range)
    if arch == "llama":
        config, cls = LlamaConfig(**common, tie_word_embeddings=False), LlamaForCausalLM
    else:
        config, cls = Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM
    torch.manual_seed(seed)
    cls(config).save_pretrained(str(folder), max_shard_size=shard_size)
    return folder


@register("causal-lm")
def build(cfg, weights: _weights.WeightsReader | None = None) -> TaskSpec:
    method = cfg.finetune.method
    if method == "qlora":
        raise UserError("training.finetune.method: qlora needs a CUDA GPU and bitsandbytes; "
                        + ("this process has no GPU" if not torch.cuda.is_available()
                           else "this version of kubetrain offers lora and full on GPUs") + ": use lora")
    uri = cfg.pretrained
    if not isinstance(uri, str):
        raise UserError("training.pretrained: causal-lm needs a save_pretrained folder (file://, s3://, hf://)")
    reader = _weights.current_reader(weights)
    folder = reader.fetch_directory(uri.rstrip("/"), "training.pretrained")
    files = llm.check_folder(folder, uri)
    tokenizer = llm.load_tokenizer(folder, uri)
    with tempfile.TemporaryDirectory(prefix="kubetrain-data-") as scratch:  # s3:// data files, read into memory
        train_set, eval_set, eval_rows, fmt = _datasets(
            cfg, tokenizer, lambda u: reader.fetch_file(u, "training.data.path", Path(scratch)))
    model = llm.build_skeleton(folder, uri)
    model.config.use_cache = False  # training: no KV cache (generation turns it on)
    lora = cfg.finetune.lora if method == "lora" else None
    if lora is not None:
        model = llm.add_lora(model, lora)
    if cfg.activation_checkpointing:
        # transformers 5.25 renamed it; both recompute each decoder layer (non-reentrant: FSDP2-safe)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = sum(1 for m in model.modules()
                     if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)
        log.info("activation checkpointing: %d layers recompute their activations in the backward pass", layers)

    def materialize(module, device: torch.device) -> None:
        before = llm.peak_rss_bytes()
        nbytes = llm.materialize(module, files, device, cfg.seed, uri)
        after = llm.peak_rss_bytes()
        log.info("weights: read %.1f MB of %s into this process (peak RSS %.0f MB, %+.0f MB while loading)",
                 nbytes / 1e6, uri, after / 1e6, (after - before) / 1e6)

    options = cfg.options
    collate = data.CausalCollate(tokenizer.pad_token_id)
    return TaskSpec(
        model=model, train_dataset=data.WithLengths(train_set), eval_dataset=data.WithLengths(eval_set),
        loss_fn=causal_lm_loss, collate_fn=collate, count_tokens=collate.count_tokens, accuracy=True,
        eval_counts=label_counts, materialize=materialize,
        generate=Generations(tokenizer, eval_rows, fmt, int(options.get("evalPrompts", 4)),
                             int(options.get("maxNewTokens", 16))),
        checkpoint_keys=llm.is_adapter if lora is not None else None,
        export=HuggingFaceExport(folder, uri, tokenizer, lora), perplexity=True,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.tasks.causal_lm FOLDER [--arch qwen2]`: write a tiny random model folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.tasks.causal_lm",
                                     description="write a tiny random causal LM folder (an offline stand-in)")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    args = parser.parse_args(argv)
    print(save_tiny_model(args.folder, arch=args.arch))


if __name__ == "__main__":
    main()
