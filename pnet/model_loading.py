"""Model configs and saved folders: checking config keys, loading a folder without running its code, and what the
tokenizer saved beside a model must hold.

A folder saved by this package carries its modeling code (``auto_map``) so that it loads anywhere with
``trust_remote_code=True``. Here, where the package is installed, that code need not run: the installed classes are
registered with the transformers Auto API, and `trust_remote_code_for` loads them without executing any file of the
folder unless the user asked for it (``--trust-remote-code``), as transformers and lm-eval require.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from pathlib import Path
from typing import Any, Callable

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Keyword arguments of `from_pretrained` that transformers stores in a tokenizer's init_kwargs and would write into
# tokenizer_config.json: they describe how it was loaded here, not the tokenizer, and break loading elsewhere.
LOAD_TIME_TOKENIZER_KWARGS = (
    "local_files_only", "is_local", "cache_dir", "revision", "token", "use_auth_token", "trust_remote_code",
    "force_download", "proxies", "subfolder", "resume_download", "_from_auto", "_commit_hash", "name_or_path",
)


PROVIDED_MODEL_TYPES = ("pnet_llama", "parameternet", "pnet_swin")  # registered by this project's two model packages


@functools.cache
def register_installed_models() -> frozenset[str]:
    """Import this project's model packages (each registers its classes with the Auto API on import) and return the
    model types they provide."""
    import modeling_parameternet  # noqa: F401
    import modeling_pnet_llama  # noqa: F401

    return frozenset(t for t in PROVIDED_MODEL_TYPES if t in CONFIG_MAPPING)


def config_class(model_type: str | None) -> type[PretrainedConfig]:
    register_installed_models()
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} is not a transformers model type nor one of this package's")
    return CONFIG_MAPPING[model_type]


@functools.cache
def config_keys(cls: type[PretrainedConfig]) -> frozenset[str]:
    """Every key a config of class ``cls`` understands: its fields and what ``to_dict`` writes."""
    keys = set(cls().to_dict())
    if dataclasses.is_dataclass(cls):
        keys |= {f.name for f in dataclasses.fields(cls)}
    return frozenset(keys | {"auto_map", "num_labels"})  # num_labels: a constructor argument (sets id2label)


def unknown_key_message(unknown: list[str], allowed: typing.Iterable[str], where: str) -> str:
    allowed = sorted(allowed)
    hints = [f"{key!r} -> did you mean {close[0]!r}?" for key in unknown
             if (close := difflib.get_close_matches(key, allowed, n=1))]
    return (f"{where + ': ' if where else ''}unknown key(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
            + f"; allowed: {allowed}")


def check_config_keys(values: dict[str, Any], cls: type[PretrainedConfig], where: str) -> None:
    """Raise ValueError for keys ``cls`` does not know (a typo such as ``num_expert`` would otherwise be stored as a
    junk attribute while the real field keeps its default)."""
    unknown = sorted(set(values) - config_keys(cls))
    if unknown:
        raise ValueError(unknown_key_message(unknown, config_keys(cls) - {"transformers_version", "_name_or_path"},
                                             where))


def make_config(values: dict[str, Any], where: str) -> PretrainedConfig:
    """``AutoConfig.for_model`` on a config.json-style dict; the config class's own validation errors name ``where``."""
    values = dict(values)
    model_type = values.pop("model_type", None)
    cls = config_class(model_type)
    check_config_keys(values, cls, where)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    check_built_config(config, where)
    return config


def check_built_config(config: PretrainedConfig, where: str) -> None:
    """What config classes accept but their models fail on later: an unknown activation (a KeyError when the model is
    built) and attention heads that do not divide (an error at the first forward)."""
    from transformers.activations import ACT2FN

    activation = getattr(config, "hidden_act", None)
    if isinstance(activation, str) and activation not in ACT2FN:
        close = difflib.get_close_matches(activation, list(ACT2FN), n=1)
        raise ValueError(f"{where}: hidden_act={activation!r} is not an activation transformers knows"
                         + (f" (did you mean {close[0]!r}?)" if close else "") + f"; allowed: {sorted(ACT2FN)}")
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads} "
                         f"(each key/value head serves a whole group of query heads); allowed: {divisors}")
    hidden = getattr(config, "hidden_size", None)
    if (getattr(config, "head_dim", None) is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            and hidden % heads):
        raise ValueError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; allowed: "
                         "a multiple of it, or set head_dim")


def read_config_dict(model: str) -> dict[str, Any]:
    """The config.json of a local folder or Hub repo, read as data (no code runs)."""
    values, _ = PretrainedConfig.get_config_dict(model)
    return values


def trust_remote_code_for(model: str, trust_remote_code: bool = False,
                          log: Callable[[str], None] = print) -> bool:
    """The ``trust_remote_code`` value to load ``model`` with, deciding before anything is loaded.

    * ``trust_remote_code=True`` (the user asked): the folder's own code runs, as transformers does it.
    * a model type this package provides (`PROVIDED_MODEL_TYPES`) or transformers has: the installed,
      registered classes load it and no file of the folder is executed; said in the log when the folder ships code.
    * otherwise (the folder's ``auto_map`` code is the only way to load it): ValueError asking for
      ``--trust-remote-code``.
    """
    provided = register_installed_models()
    values = read_config_dict(model)
    model_type = values.get("model_type")
    ships_code = bool(values.get("auto_map"))
    if trust_remote_code:
        if ships_code:
            log(f"{model}: --trust-remote-code given: the folder's own modeling code (auto_map) will run")
        return True
    if model_type in provided:
        if ships_code:
            log(f"{model}: model_type {model_type!r} is provided by the installed pnet package: loading its "
                "registered classes; the folder's code files are not executed (pass --trust-remote-code to run them)")
        return False
    if model_type in CONFIG_MAPPING:
        return False
    if ships_code:
        raise ValueError(f"{model}: model_type {model_type!r} is neither a transformers model nor one this package "
                         "provides; loading it means running the Python code in the folder (auto_map). Pass "
                         "--trust-remote-code if you trust that code.")
    raise ValueError(f"{model}: unknown model_type {model_type!r} and no auto_map: transformers cannot load it")


class CheckpointKeysError(ValueError):
    """A checkpoint whose weights do not match its model: loading it would random-initialise or drop weights."""


def saved_weight_names(folder: str | Path) -> set[str] | None:
    """The tensor names of a folder's safetensors weights (one file or an index of shards), read from the headers
    alone; None when the folder has no safetensors weights."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    if not (folder / "model.safetensors").is_file():
        return None
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        return set(weights.keys())


def weight_key_problems(model, saved: set[str], allowed_missing: typing.Iterable[str] = (),
                        allowed_unexpected: typing.Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(missing, unexpected) weight names of a checkpoint holding ``saved`` for ``model`` (built on any device, meta
    included). Tied weights (e.g. lm_head and the embedding) count as present when one of their names is saved;
    names starting with an ``allowed_*`` prefix are expected to differ (a new classification head)."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    known = {name for names in names_by_tensor.values() for name in names}
    missing = sorted(names[0] for names in names_by_tensor.values()
                     if not saved.intersection(names) and not names[0].startswith(tuple(allowed_missing)))
    unexpected = sorted(name for name in saved - known if not name.startswith(tuple(allowed_unexpected)))
    return missing, unexpected


def check_checkpoint_weights(model: str, trust_remote_code: bool = False, head: str = "causal-lm") -> None:
    """Refuse, before loading, a model folder whose safetensors weights miss some of the model's weights or hold
    others: transformers would random-initialise the missing ones (e.g. a deleted ``q_proj``) and evaluate or train
    on them with only a line in its load report. The model is built on the meta device from the folder's config
    (no memory, no weights read). ``head`` "sequence-classification" allows the new ``score`` head and the unused
    ``lm_head`` of a causal-LM checkpoint. Folders without safetensors weights (a Hub id) are not checked here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    saved = saved_weight_names(model) if Path(model).is_dir() else None
    if saved is None:
        return
    auto = AutoModelForSequenceClassification if head == "sequence-classification" else AutoModelForCausalLM
    register_installed_models()
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    allowed = {"allowed_missing": ["score."], "allowed_unexpected": ["lm_head."]} if head != "causal-lm" else {}
    missing, unexpected = weight_key_problems(skeleton, saved, **allowed)
    if missing or unexpected:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        raise CheckpointKeysError(
            f"{model}: its weights do not match its config: "
            + "; ".join(part for part in (f"missing {len(missing)}: {names(missing)}" if missing else "",
                                          f"unexpected {len(unexpected)}: {names(unexpected)}" if unexpected else "")
                        if part)
            + ". Loading it would random-initialise or drop those weights; re-export the model (or restore the file)")


def prepare_tokenizer_for_model(tokenizer: PreTrainedTokenizerBase,
                                model_config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """Make ``tokenizer`` ready to be saved beside a model with config ``model_config`` (in place; returned).

    * a pad token (LLaMA's tokenizer has none, and batched generation and classifier batches need one): ``<unk>``,
      which byte-fallback text never produces, else EOS; the model config's ``pad_token_id`` is set to it when unset;
    * ``model_max_length`` = the model's ``max_position_embeddings`` (what the model can attend over);
    * no load-time settings (``local_files_only``, ``cache_dir``, ...) left to be written into tokenizer_config.json.

    The saved files are a standard LLaMA tokenizer (no ``auto_map``): ``LlamaTokenizer.from_pretrained(DIR)`` loads
    them anywhere with no code. ``AutoTokenizer.from_pretrained(DIR)`` first resolves DIR's config.json, whose model
    type only the folder's config code (or this installed package) provides, so it needs ``trust_remote_code=True``
    like the model; without it transformers asks (tests/test_tokenizer_folder.py).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError("tokenizer has neither a pad, an unk nor an EOS token to pad with")
    if getattr(model_config, "pad_token_id", None) is None:
        model_config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if max_positions is not None:
        tokenizer.model_max_length = max_positions
        tokenizer.init_kwargs["model_max_length"] = max_positions
    for key in LOAD_TIME_TOKENIZER_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer
