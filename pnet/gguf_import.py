"""``pnet-import-gguf``: a LLaMA-architecture GGUF file becomes a plain Hugging Face LLaMA folder.

    pnet-import-gguf MODEL.gguf OUT_DIR

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package) and
dequantises its weights to float32, but refuses to ``save_pretrained`` the model it gets. This command rebuilds a plain
``LlamaForCausalLM`` from that model's config and weights and writes safetensors weights, a config with no
quantisation entry, the tokenizer with its chat template and a model card naming the source file and its sha256. It
reloads the written folder and checks that it gives the same logits as the GGUF-loaded model before publishing it;
the folder appears complete or not at all. The file is checked (readable GGUF, LLaMA architecture) before any weight
is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pnet.run_lock import OutputLockedError, OutputNotWritableError, exclusive_output

GGUF_ARCHITECTURE = "llama"  # the `general.architecture` this command converts (LLaMA, SmolLM, TinyLlama, ...)
# The converted folder must give the GGUF-loaded model's logits: same float32 weights, same code, same order of sums.
CONVERSION_ATOL = 0.0


class GGUFImportError(ValueError):
    """A GGUF file this command cannot convert (unreadable, another architecture, non-finite weights)."""


def gguf_metadata(gguf_file: Path) -> dict[str, str]:
    """The string fields of the file's header (``general.architecture``, ``general.name``, ...); raises
    GGUFImportError naming the file if it is missing or not a readable GGUF file."""
    from gguf import GGUFReader, GGUFValueType

    if not gguf_file.is_file():
        raise GGUFImportError(f"{gguf_file}: no such file (expected a .gguf model file)")
    try:
        reader = GGUFReader(gguf_file)
    except Exception as error:  # the reader raises ValueError, struct.error, IndexError ... on damaged input
        raise GGUFImportError(f"{gguf_file}: not a readable GGUF file ({type(error).__name__}: {error})") from None
    return {name: field.contents() for name, field in reader.fields.items()
            if field.types == [GGUFValueType.STRING]}


def card_text(gguf_file: Path, metadata: dict[str, str], sha256: str, parameters: int) -> str:
    name = metadata.get("general.name", gguf_file.stem)
    license_line = f"license: {metadata['general.license']}\n" if "general.license" in metadata else ""
    return (
        f"---\n{license_line}library_name: transformers\npipeline_tag: text-generation\ntags:\n- llama\n- gguf-import\n"
        f"---\n\n# {name} (from GGUF)\n\n"
        f"A plain `LlamaForCausalLM` ({parameters:,} parameters, float32) converted by `pnet-import-gguf` from "
        f"`{gguf_file.name}` (sha256 `{sha256}`). The weights are the GGUF file's values dequantised to float32: "
        "a quantised file (Q4_1, Q8_0, ...) gives the quantised model, not the original full-precision one. The "
        "tokenizer and its chat template come from the same file.\n"
    )


def import_gguf(gguf_file: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Convert ``gguf_file`` into the Hugging Face folder ``out_dir``; returns a summary (parameters, the logit
    check). The file and the output folder are checked before any weight is read."""
    from pnet.checkpoint import check_new_folder

    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    check_new_folder(out_dir, overwrite)  # a file, a non-empty folder, an OUT_DIR.tmp that is not pnet's
    if out_dir.resolve() in gguf_file.parents:
        raise FileExistsError(f"{out_dir} holds the input file {gguf_file.name}: write the folder elsewhere")
    metadata = gguf_metadata(gguf_file)
    architecture = metadata.get("general.architecture")
    if architecture != GGUF_ARCHITECTURE:
        raise GGUFImportError(f"{gguf_file}: general.architecture is {architecture!r}; pnet-import-gguf converts "
                              f"{GGUF_ARCHITECTURE!r} models only")
    # OUT_DIR is replaced whole (written beside, then renamed): its lock is a file beside it, taken (and the folder's
    # parent created, or refused as not writable) before any weight is read.
    with exclusive_output(out_dir, lock_path=out_dir.with_name(f".{out_dir.name}.pnet-import-gguf.lock")):
        return _convert(gguf_file, out_dir, metadata)


def _convert(gguf_file: Path, out_dir: Path, metadata: dict) -> dict:
    """Load, check, write beside OUT_DIR and publish (the checks of `import_gguf` done, OUT_DIR locked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pnet.checkpoint import file_sha256, new_partial_dir, publish_dir
    from pnet.model_loading import config_keys, prepare_tokenizer_for_model
    from pnet.upcycle import max_logit_difference

    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    if loaded.config.model_type != "llama":  # transformers reads some llama-architecture files as mistral
        raise GGUFImportError(f"{gguf_file}: transformers reads it as model_type {loaded.config.model_type!r}, "
                              "not 'llama'")
    state_dict = loaded.state_dict()
    bad = [key for key, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise GGUFImportError(f"{gguf_file}: non-finite values in {bad[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    # How it was loaded here (GGUF quantisation, the file's `general.name`), not what the model is; and what the GGUF
    # loader sets beyond LlamaConfig's own keys (`unk_token_id`: the tokenizer's, which keeps it), which pnet's config
    # check (pnet-count, pnet-upcycle's card) rightly refuses as unknown.
    leftovers = set(config.to_dict()) - config_keys(LlamaConfig)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", *sorted(leftovers)):
        if hasattr(config, key):
            delattr(config, key)
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(state_dict, strict=True)
    tokenizer = prepare_tokenizer_for_model(tokenizer, plain.config)

    tmp = new_partial_dir(out_dir)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    parameters = sum(p.numel() for p in plain.parameters())
    (tmp / "README.md").write_text(card_text(gguf_file, metadata, file_sha256(gguf_file), parameters))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    difference = max_logit_difference(loaded, reloaded, config.vocab_size)
    if difference > CONVERSION_ATOL:
        raise RuntimeError(f"the converted folder {tmp} does not give the GGUF model's logits: max |difference| "
                           f"{difference:.3g} > {CONVERSION_ATOL}")
    publish_dir(tmp, out_dir)
    return {"parameters": parameters, "max_logit_difference": difference, "out_dir": str(out_dir),
            "name": metadata.get("general.name", gguf_file.stem), "has_chat_template": bool(tokenizer.chat_template)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-import-gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_file", help="a GGUF model file whose general.architecture is 'llama'")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        summary = import_gguf(args.gguf_file, args.out_dir, args.overwrite)
    except (GGUFImportError, FileExistsError, OutputLockedError, OutputNotWritableError) as error:
        parser.error(str(error))
    print(f"{summary['out_dir']}: {summary['name']}, {summary['parameters']:,} parameters, chat template: "
          f"{'yes' if summary['has_chat_template'] else 'no'}; max |logit difference| to the GGUF-loaded model on "
          f"a probe batch: {summary['max_logit_difference']:.2e}")


if __name__ == "__main__":
    main()
