"""pnet-card: write a Hugging Face Hub model card (README.md) into a saved model folder.

    pnet-card runs/pnet-1b-up-e8/final [--train-config configs/pretrain/<name>.yaml] [--license apache-2.0]

The card is built with `huggingface_hub.ModelCard` / `ModelCardData`: YAML metadata (license,
`library_name: transformers`, tags, datasets, `pipeline_tag`, `model-index` with every zero-shot and SST-2 result)
and a body with the architecture and routing settings, total/active parameters and FLOPs (`pnet.counting`), the
training recipe and data mix (the pretraining YAML: `--train-config`, or `pretrain_config.yaml` found in the
folder or its run folder), the evaluation tables (with the perplexity of every text `pnet-eval --perplexity` scored)
and a usage snippet. The card is chosen by `model_type`:
"pnet_llama"/"llama" get a text-generation card, "parameternet" and "pnet_swin" an image-classification card (accuracy from the
vision run's `results.json`). The folder is then ready for `push_to_hub`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pnet.counting import short_number
from pnet.run_log import UPCYCLING_FILE, VISION_RESULTS_FILE
from pnet_eval import perplexity
from pnet_eval.report import ModelResults, load_model_results
from pnet_eval.results_files import check_number, read_json_object

TRAIN_CONFIG_FILES = ("pretrain_config.yaml", "pretrain_config.json")
PAPER = "https://arxiv.org/abs/2306.14525"
CITATION = """@inproceedings{han2024parameternet,
  title     = {ParameterNet: Parameters Are All You Need for Large-scale Visual Pretraining of Mobile Networks},
  author    = {Han, Kai and Wang, Yunhe and Guo, Jianyuan and Wu, Enhua},
  booktitle = {CVPR},
  year      = {2024},
  note      = {arXiv:2306.14525}
}"""
# Hub dataset ids, configs and the split lm-eval scores, per zero-shot task (as in lm-eval's upstream YAMLs).
ZERO_SHOT_DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy", "test"),
    "boolq": ("aps/super_glue", "BoolQ", "boolq", "validation"),
    "hellaswag": ("Rowan/hellaswag", "HellaSwag", None, "validation"),
    "sst2": ("nyu-mll/glue", "SST-2", "sst2", "validation"),
}
TEXT_MODEL_TYPES = ("pnet_llama", "llama")
# Per vision model type: what the card says the model is, its tags, and the config keys of its architecture table.
VISION_CARDS = {
    "parameternet": (
        "A **ParameterNet** image classifier ([Han et al.]({paper})): GhostNet whose convolutions are dynamic "
        "(mixtures of {num_experts} expert kernels weighted per image), adding parameters at almost no extra FLOPs",
        ["ghostnet", "dynamic-convolution"],
        ("image_size", "num_channels", "width_multiplier", "num_experts", "routing_activation", "hidden_act"),
    ),
    "pnet_swin": (
        "A **ParameterNet Swin** image classifier ([Han et al.]({paper}), Table 5): transformers' Swin whose MLP "
        "output projection (fc2) in the blocks {moe_blocks} is {num_experts} experts with a top-1 router, adding "
        "parameters at almost no extra FLOPs",
        ["swin", "mixture-of-experts"],
        ("image_size", "num_channels", "embed_dim", "depths", "num_heads", "window_size", "num_experts",
         "moe_blocks", "router_aux_loss_coef"),
    ),
}
VISION_MODEL_TYPES = tuple(VISION_CARDS)


def find_train_config(model_dir: Path, explicit: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The pretraining config (YAML/JSON) named on the command line or saved in the folder / its run folder."""
    candidates = (
        [Path(explicit)] if explicit else [d / n for d in (model_dir, model_dir.parent) for n in TRAIN_CONFIG_FILES]
    )
    for path in candidates:
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return yaml.safe_load(f), str(path)
    if explicit:
        raise FileNotFoundError(f"--train-config {explicit!r} does not exist")
    return None, None


def card_path(path: str | Path, model_dir: Path) -> str:
    """How the card names a local file, never as an absolute path of this machine: relative to the model folder
    when inside it, `run folder/NAME` when in the run folder above it, relative to the working directory when
    inside it (`configs/pretrain/tiny-cpu.yaml` from a checkout), else the bare file name."""
    path = Path(path).expanduser().resolve()
    model_dir = model_dir.resolve()
    if path.is_relative_to(model_dir):
        return path.relative_to(model_dir).as_posix()
    if path.parent == model_dir.parent:
        return f"run folder/{path.name}"
    if path.is_relative_to(Path.cwd()):
        return path.relative_to(Path.cwd()).as_posix()
    return path.name


def _fmt(n: int | float | None, kind: str = "params") -> str:
    """`1,540,507,648 (1.54B)`; FLOPs with kind="flops"."""
    if n is None:
        return "-"
    short = short_number(n, kind)
    return f"{n:,}" if short == str(n) else f"{n:,} ({short})"  # not "512 (512)"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_eval_results(results: ModelResults) -> list[EvalResult]:
    """model-index entries: each zero-shot metric and the fine-tuned SST-2 accuracy (labelled when offline)."""
    entries = []
    zero_shot = results.zero_shot or {}
    source = zero_shot.get("data_source", "hub")
    for task, entry in zero_shot.get("tasks", {}).items():
        dataset_id, pretty, config, split = ZERO_SHOT_DATASETS[task]
        for metric in ("acc", "acc_norm"):
            if entry.get(metric) is None:
                continue
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=f"{pretty} (zero-shot, lm-eval {entry.get('lm_eval_task', task)})",
                    dataset_type=dataset_id,
                    dataset_name=pretty,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=f"{metric} (0-shot, {entry.get('docs')} docs, data {source})",
                    metric_value=round(100 * entry[metric], 2),
                )
            )
    if results.sst2:
        dataset_id, pretty, config, split = ZERO_SHOT_DATASETS["sst2"]
        entries.append(
            EvalResult(
                task_type="text-classification",
                task_name=f"{results.sst2['label']} (fine-tuned classifier)",
                dataset_type=dataset_id,
                dataset_name=results.sst2["label"],
                dataset_config=config,
                dataset_split=split,
                metric_type="accuracy",
                metric_name=f"accuracy ({results.sst2['eval_examples']} sentences)",
                metric_value=round(100 * results.sst2["accuracy"], 2),
            )
        )
    return entries


def text_card_body(results: ModelResults, train_config: dict | None, train_config_path: str | None,
                   upcycling: dict | None = None) -> str:
    """The card's body; `train_config_path` as the card names it (`card_path`)."""
    config = results.config
    routed = config.get("model_type") == "pnet_llama"
    parts = [f"# {results.name}\n"]
    if routed:
        parts.append(
            f"A **PNet-LLaMA** language model: ParameterNet ([Han et al.]({PAPER}), Table 7) applied to LLaMA. The "
            f"{', '.join(config['moe_projections'])} projection(s) of every FFN hold {config['num_experts']} "
            "experts and a "
            "Switch-style top-1 router picks one per token, so the model has more parameters than the dense LLaMA "
            "of the same shape at (almost) the same FLOPs. Custom code: load with `trust_remote_code=True`.\n"
        )
    else:
        parts.append(f"A dense **LLaMA** baseline for ParameterNet ([Han et al.]({PAPER}), Table 7).\n")
    if upcycling:
        parts.append(upcycling_section(upcycling))
    parts.append(_architecture_section(config, routed))
    if results.counts:
        parts.append(_size_section(results.counts))
    training = _training_section(results, train_config, train_config_path)
    if training:
        parts.append(training)
    parts.append(text_eval_section(results))
    parts.append(
        "## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'repo = "{results.name}"  # or the local folder\n'
        "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)\n"
        'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))\n```\n\n"
        "Zero-shot evaluation: `pnet-eval MODEL_DIR` (lm-eval, `trust_remote_code=True`); SST-2: "
        "`python scripts/finetune_sst2.py MODEL_DIR`.\n"
    )
    parts.append("## Citation\n\n```bibtex\n" + CITATION + "\n```\n")
    return "\n".join(parts)


ROUTING_CONFIG_KEYS = (
    "num_experts",
    "moe_projections",
    "shared_router",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_jitter_noise",
    "expert_capacity_factor",
    "expert_output_scaling",
)
RECIPE_KEYS = (
    "max_steps",
    "global_batch_tokens",
    "micro_batch_size",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "precision",
    "seed",
)


def _architecture_section(config: dict, routed: bool) -> str:
    arch = [
        ["hidden size", config.get("hidden_size")],
        ["intermediate size", config.get("intermediate_size")],
        ["layers", config.get("num_hidden_layers")],
        ["attention heads (key/value)", f"{config.get('num_attention_heads')} ({config.get('num_key_value_heads')})"],
        ["vocabulary", config.get("vocab_size")],
        ["max positions", config.get("max_position_embeddings")],
    ]
    if routed:
        arch += [[key, json.dumps(config.get(key))] for key in ROUTING_CONFIG_KEYS if key in config]
    return "## Architecture\n\n" + _table(["setting", "value"], arch) + "\n"


def _size_section(counts) -> str:
    size = [
        ["total parameters", _fmt(counts.total_params)],
        ["active parameters per token", _fmt(counts.active_params)],
        ["forward FLOPs", _fmt(counts.flops, "flops")],
    ]
    size += [
        [k, _fmt(v, "flops" if "flops" in k else "params") if isinstance(v, int) else v]
        for k, v in counts.details.items()
    ]
    return "## Size\n\n" + _table(["", "value"], size) + f"\n\nFLOPs convention: {counts.flops_convention}.\n"


def _training_section(results: ModelResults, train_config: dict | None, train_config_path: str | None) -> str | None:
    """The recipe and data mix of the training config (when known) and the final training loss; None if neither."""
    training = []
    if train_config:
        recipe = [[k, train_config[k]] for k in RECIPE_KEYS if k in train_config]
        data = train_config.get("data", {})
        if "seq_len" in data:
            recipe.append(["sequence length", data["seq_len"]])
        training.append(
            f"Recipe (from `{train_config_path}`): AdamW, linear warmup, cosine decay.\n\n"
            + _table(["hyper-parameter", "value"], recipe)
        )
        sources = data.get("sources", {})
        if sources:
            mix = [
                [name, s.get("weight"), s.get("path"), json.dumps(s.get("data_files") or s.get("name"))]
                for name, s in sources.items()
            ]
            training.append("Data mix:\n\n" + _table(["source", "weight", "dataset", "files / config"], mix))
    if results.training_loss is not None:
        training.append(
            f"Final training LM loss: **{results.training_loss:.3f}** "
            f"(mean of the last logged steps of `{card_path(results.training_loss_source, Path(results.model_dir))}`)."
        )
    return "## Training\n\n" + "\n\n".join(training) + "\n" if training else None


def read_upcycling(model_dir: Path) -> dict[str, Any] | None:
    """The record `pnet-upcycle` writes beside an upcycled model (from what, how), or None."""
    path = model_dir / UPCYCLING_FILE
    return read_json_object(path) if path.is_file() else None


def upcycling_section(record: dict[str, Any]) -> str:
    """What the card says about a model made by `pnet-upcycle` rather than trained from scratch."""
    routed = ", ".join(record["moe_projections"])
    router = "one shared router per layer" if record.get("shared_router") else "one router per routed projection"
    text = (
        f"Upcycled from the dense LLaMA **{record['dense_model']}** by `pnet-upcycle` (sparse upcycling): the "
        f"{routed} projection(s) of every FFN became {record['num_experts']} experts, each a copy of the dense "
        f"projection, with {router}, freshly initialised, and expert output scaling "
        f"`{record['expert_output_scaling']}`. Max |logit difference| to the dense model on a probe batch: "
        f"{record['max_logit_difference_before_perturbation']:.1e}"
    )
    if record.get("perturb_fraction"):
        text += (
            f" before perturbation. Then Drop-Upcycling (arXiv 2502.19261): in each expert a random "
            f"{record['perturb_fraction']:.0%} of the intermediate dimensions was re-initialised from a normal "
            f"distribution with the dense matrix's mean and standard deviation (seed {record['seed']}); max "
            f"|logit difference| afterwards: {record['max_logit_difference']:.2f}"
        )
    if record.get("dense_weights_sha256"):
        text += f". Dense weights: `model.safetensors` sha256 `{record['dense_weights_sha256']}`"
    return "## Upcycling\n\n" + text + ".\n"


def _pct(entry: dict[str, Any], metric: str) -> str:
    """'49.58 ± 1.03' (percent, with lm-eval's stderr) or '-' when the task has no such metric."""
    if entry.get(metric) is None:
        return "-"
    return f"{100 * entry[metric]:.2f} ± {100 * (entry.get(f'{metric}_stderr') or 0):.2f}"


def text_eval_section(results: ModelResults) -> str:
    zero_shot = results.zero_shot or {}
    rows = []
    for task, entry in zero_shot.get("tasks", {}).items():
        rows.append(
            [ZERO_SHOT_DATASETS[task][1], "0-shot", entry.get("docs"), _pct(entry, "acc"), _pct(entry, "acc_norm")]
        )
    if results.sst2:
        rows.append(
            [
                results.sst2["label"],
                "fine-tuned",
                results.sst2["eval_examples"],
                f"{100 * results.sst2['accuracy']:.2f}",
                "-",
            ]
        )
    perplexity_part = text_perplexity_part(results)
    if not rows and perplexity_part is None:
        return (
            "## Evaluation\n\nNo results yet: run `pnet-eval` (zero-shot, `--perplexity FILE`) and "
            "`scripts/finetune_sst2.py` on this folder.\n"
        )
    parts = []
    if rows:
        notes = []
        if zero_shot:
            notes.append(
                f"Zero-shot: lm-eval {zero_shot.get('lm_eval_version')}, data {zero_shot.get('data_source')}, "
                f"dtype {zero_shot.get('dtype')}"
                + (f", **limit {zero_shot['limit']} docs per task**" if zero_shot.get("limit") else "")
                + "."
            )
        parts.append(_table(["task", "setting", "docs", "acc (%)", "acc_norm (%)"], rows) + "\n\n" + " ".join(notes))
    if perplexity_part is not None:
        parts.append(perplexity_part)
    return "## Evaluation\n\n" + "\n\n".join(parts) + "\n"


def text_perplexity_part(results: ModelResults) -> str | None:
    """One row per text file `pnet-eval --perplexity` scored, with `pnet-report`'s metrics and note; None without
    results. In the body only, not in `model-index`: a local file has no Hub dataset id to name."""
    entries = perplexity.report_entries(results.perplexity)
    if not entries:
        return None
    row = {"perplexity": entries}  # as a `pnet-report` row, so that the cells and notes are the report's
    columns = perplexity.report_columns([row])
    rows = [
        [label, entry["docs"], entry["tokens"], entry["max_length"]]
        + perplexity.report_cells(row, [column for column in columns if column[0] == label])
        for label, entry in entries.items()
    ]
    header = ["text", "docs", "tokens", "window"] + [title for _, title, _ in perplexity.REPORT_METRICS]
    return "Perplexity:\n\n" + _table(header, rows) + "\n\n" + " ".join(perplexity.report_notes([row]))


def vision_card(results: ModelResults, vision_results: dict | None, license: str) -> ModelCard:
    config, counts = results.config, results.counts
    description, model_tags, arch_keys = VISION_CARDS[config["model_type"]]
    eval_results = None
    accuracy = (vision_results or {}).get("test_accuracy")
    dataset = (vision_results or {}).get("dataset")
    if accuracy is not None and dataset:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="accuracy",
                metric_value=round(100 * accuracy, 2),
            )
        ]
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        model_name=results.name,
        tags=["parameternet", *model_tags, "image-classification", "custom_code"],
        datasets=[dataset] if dataset else None,
        eval_results=eval_results,
    )
    arch = [[k, json.dumps(config.get(k))] for k in (*arch_keys, "num_labels") if k in config]
    body = [
        f"# {results.name}\n",
        description.format(paper=PAPER, num_experts=config.get("num_experts"), moe_blocks=config.get("moe_blocks"))
        + ". Custom code: load with `trust_remote_code=True`.\n",
        "## Architecture\n\n" + _table(["setting", "value"], arch) + "\n",
    ]
    if counts:
        body.append(
            "## Size\n\n"
            + _table(
                ["", "value"],
                [
                    ["parameters", _fmt(counts.total_params)],
                    ["FLOPs", _fmt(counts.flops, "flops")],
                ],
            )
            + f"\n\nFLOPs convention: {counts.flops_convention}.\n"
        )
    if vision_results:
        shown = {k: v for k, v in vision_results.items() if isinstance(v, (int, float, str))}
        body.append("## Evaluation\n\n" + _table(["metric", "value"], [[k, v] for k, v in shown.items()]) + "\n")
    body.append(
        "## Usage\n\n```python\nfrom transformers import AutoImageProcessor, AutoModelForImageClassification\n\n"
        f'repo = "{results.name}"  # or the local folder\n'
        "processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)\n"
        "model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)\n"
        'logits = model(**processor(images=image, return_tensors="pt")).logits\n```\n'
    )
    body.append("## Citation\n\n```bibtex\n" + CITATION + "\n```\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def build_card(model_dir: str | Path, license: str = "apache-2.0", train_config: str | None = None,
               name: str | None = None) -> ModelCard:
    """The model card for a saved folder, dispatched on its `model_type`. `name`: what the card calls the model
    (default: from the folder, see `load_model_results`), e.g. the name a folder written beside it will publish as."""
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist or has no config.json")
    results = load_model_results(model_dir)
    if name is not None:
        results.name = name
    model_type = results.config.get("model_type")
    if model_type in VISION_MODEL_TYPES:
        vision_results = None
        for folder in (model_dir, model_dir.parent):
            if (folder / VISION_RESULTS_FILE).is_file():
                vision_results = read_json_object(folder / VISION_RESULTS_FILE)
                check_number(folder / VISION_RESULTS_FILE, "test_accuracy", vision_results.get("test_accuracy"), 0, 1)
                break
        return vision_card(results, vision_results, license)
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} has no card; allowed: {list(TEXT_MODEL_TYPES + VISION_MODEL_TYPES)}"
        )
    config_dict, config_path = find_train_config(model_dir, train_config)
    upcycling = read_upcycling(model_dir)
    dense_hub_id = upcycling and upcycling["dense_model"]
    if dense_hub_id and (dense_hub_id.count("/") != 1 or Path(dense_hub_id).exists()):
        dense_hub_id = None  # a local folder: the Hub's base_model field takes Hub ids only
    sources = ((config_dict or {}).get("data") or {}).get("sources") or {}
    hub_datasets = [
        s["path"] for s in sources.values() if s.get("path") and s["path"] not in ("json", "text", "parquet", "csv")
    ]
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=results.name,
        tags=["parameternet", "pnet", "llama", "custom_code"]
        + (["mixture-of-experts"] if model_type == "pnet_llama" else [])
        + (["upcycled"] if upcycling else []),
        base_model=dense_hub_id or None,
        datasets=hub_datasets or None,
        eval_results=text_eval_results(results) or None,
    )
    config_path = None if config_path is None else card_path(config_path, model_dir)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + text_card_body(results, config_dict, config_path, upcycling))


def write_card(model_dir: str | Path, license: str = "apache-2.0", train_config: str | None = None,
               name: str | None = None) -> Path:
    """Write `build_card`'s card to MODEL_DIR/README.md; returns that path."""
    path = Path(model_dir) / "README.md"
    build_card(model_dir, license=license, train_config=train_config, name=name).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-card", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="saved model folder; the card is written to MODEL_DIR/README.md")
    parser.add_argument("--license", default="apache-2.0", help="SPDX-style Hub licence id (default: %(default)s)")
    parser.add_argument("--train-config", default=None, help="the pretraining YAML the model was trained with")
    args = parser.parse_args(argv)
    try:
        path = write_card(args.model_dir, license=args.license, train_config=args.train_config)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"pnet-card: error: {error}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
