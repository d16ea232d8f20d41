"""Loading a saved MM-GEM model folder or Hub repo safely: what is checked before anything is built.

`load_model(path)` is what `mmgem train --model`, `mmgem evaluate --model` and the training resume use:

- a local folder must be an MM-GEM model (a readable `config.json` with model_type "mmgem", a tokenizer): a folder
  without config.json would otherwise build transformers' default towers (a 7B-sized Llama);
- code from the folder never runs unless the caller opts in (`trust_remote_code=True`, `--trust-remote-code`): the
  installed classes of this project need none, and a folder whose tokenizer or image-processor config points
  (`auto_map`) at its own Python files is refused up front;
- the special-token ids of config.json must be the tokenizer's (`[EMB]` pointing at an ordinary token would change
  every embedding), and every id the model reads must lie in the vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from mmgem.errors import MMGEMUserError, checking_user_input, one_line
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor

# `auto_map` entries an MM-GEM export carries itself: they name the installed classes, which run without opt-in.
OWN_AUTO_MAP = {
    "AutoConfig": "configuration_mmgem.MMGEMConfig",
    "AutoModel": "modeling_mmgem.MMGEMModel",
    "AutoModelForImageTextToText": "modeling_mmgem.MMGEMModel",
    "AutoProcessor": "processing_mmgem.MMGEMProcessor",
}
# Files of a folder whose `auto_map` makes transformers import Python files from the folder.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
SPECIAL_TOKENS = {"emb_token_id": "[EMB]", "cap_token_id": "[CAP]", "image_token_id": "<image>"}


def _read_json(path: Path, argument: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"`{argument}`: {path} is not a readable JSON file ({error}).") from error


def _auto_map_entries(content: Any) -> list[tuple[str, str]]:
    """(Auto class, reference) pairs of every `auto_map` in a config dict, nested ones included."""
    entries: list[tuple[str, str]] = []
    if isinstance(content, dict):
        for key, value in content.items():
            if key == "auto_map" and isinstance(value, dict):
                for auto_class, reference in value.items():
                    references = reference if isinstance(reference, (list, tuple)) else [reference]
                    entries += [(auto_class, str(r)) for r in references if r is not None]
            else:
                entries += _auto_map_entries(value)
    return entries


def foreign_code_references(folder: str | os.PathLike[str]) -> list[str]:
    """The `auto_map` references of `folder` that would import code other than MM-GEM's own classes."""
    folder = Path(folder)
    found = []
    for name in AUTO_MAP_FILES:
        path = folder / name
        if path.is_file():
            for auto_class, reference in _auto_map_entries(_read_json(path, "model")):
                if OWN_AUTO_MAP.get(auto_class) != reference.split("--")[-1]:
                    found.append(f"{name}: {auto_class} -> {reference}")
    return found


def check_hub_id(path: str | os.PathLike[str], argument: str = "model") -> None:
    """Raise a FileNotFoundError naming `argument` when `path` is not a folder and cannot be a Hub repo id either
    (`/models/x`, `./x`, `~/x`, an existing file, a bare `x`: the Hub's ids without an owner are legacy models, none
    of them an MM-GEM): checked before the string is sent to the Hub as a repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = os.fspath(path)
    expected = "expected an MM-GEM folder or a Hub repo id such as `org/name`"
    if Path(text).expanduser().exists():
        raise NotADirectoryError(f"`{argument}` {text} is a file; {expected}.")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"`{argument}` {text}: no such folder ({expected}).") from None
    if text.startswith((".", "~")) or text.count("/") != 1:
        # A bare name (`nonexistent_dir`) is a valid legacy repo id, but no MM-GEM repo has one: asking the Hub would
        # only retry for seconds offline and end in a traceback.
        raise FileNotFoundError(f"`{argument}` {text}: no such folder ({expected}).")


def check_model_folder(path: str | os.PathLike[str], argument: str = "model", trust_remote_code: bool = False) -> None:
    """Raise a ValueError naming `argument` unless the local folder `path` holds an MM-GEM model.

    Checked: config.json (present, JSON, model_type "mmgem"), a tokenizer file, and, without `trust_remote_code`,
    that no config points `auto_map` at code of its own. A Hub id (not a local folder) is checked by transformers
    while it loads (with `trust_remote_code` passed on).
    """
    folder = Path(path)
    if not folder.is_dir():
        check_hub_id(path, argument)
        return
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"`{argument}` {folder} is not an MM-GEM model folder: it has no config.json (an interrupted save leaves "
            "such a folder)."
        )
    config = _read_json(config_file, argument)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "mmgem":
        raise ValueError(f"`{argument}` {folder} is not an MM-GEM model: config.json has model_type {model_type!r}.")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"`{argument}` {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the processor "
            "next to the model (`processor.save_pretrained`)."
        )
    if not trust_remote_code:
        foreign = foreign_code_references(folder)
        if foreign:
            raise ValueError(
                f"`{argument}` {folder} asks to run its own Python code ({'; '.join(foreign)}). MM-GEM needs none; "
                "pass `trust_remote_code=True` (`--trust-remote-code`) only if you trust this folder."
            )


def check_tokenizer_matches(config: Any, tokenizer: Any, argument: str = "model") -> None:
    """Raise a ValueError unless the special-token ids of `config` are the tokenizer's and all its ids fit the model.

    `config.emb_token_id` must be the tokenizer's `[EMB]` (likewise `[CAP]`, `<image>`), the tokenizer's size must
    not exceed `text_config.vocab_size`, and its pad / bos / eos ids must lie inside that vocabulary.
    """
    vocab = tokenizer.get_vocab()
    vocab_size = config.text_config.vocab_size
    for name, token in SPECIAL_TOKENS.items():
        config_id, tokenizer_id = getattr(config, name), vocab.get(token)
        if config_id != tokenizer_id:
            config_token = tokenizer.convert_ids_to_tokens(config_id) if isinstance(config_id, int) else None
            raise ValueError(
                f"`{argument}`: config.json's `{name}` is {config_id!r} (token {config_token!r} in the tokenizer), but "
                f"the tokenizer's {token} is {tokenizer_id!r}; the config and the tokenizer belong to different models."
            )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"`{argument}`: the tokenizer has {len(tokenizer)} tokens, more than the language model's vocabulary "
            f"(`text_config.vocab_size` {vocab_size})."
        )
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(
                f"`{argument}`: the tokenizer's {name} {token_id} is outside the vocabulary [0, {vocab_size})."
            )


def _remote_code_error(error: Exception, argument: str) -> ValueError:
    return ValueError(
        f"`{argument}` needs code from its own folder or repo ({error}). MM-GEM needs none; pass "
        "`trust_remote_code=True` (`--trust-remote-code`) only if you trust it."
    )


def load_model(
    path: str | os.PathLike[str], trust_remote_code: bool = False, argument: str = "model"
) -> tuple[Any, Any]:
    """An MM-GEM model and processor from a folder or Hub id, with the installed classes, checked as described above.

    Args:
        path: a folder written by `save_pretrained` (model and processor) or a Hub repo id.
        trust_remote_code: allow the folder's own tokenizer / image-processor code (never needed by MM-GEM).
        argument: the name errors give the path (e.g. "--model").
    """
    with checking_user_input():  # the path and the folder's contents are the user's input
        check_model_folder(path, argument, trust_remote_code)
    local = Path(path).is_dir()
    try:
        processor = MMGEMProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        config = MMGEMModel.config_class.from_pretrained(str(path))
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise _remote_code_error(error, argument) from error
        raise
    except OSError as error:  # a repo id the Hub does not have, or a Hub that cannot be reached
        if local:
            raise
        raise MMGEMUserError(
            f"`{argument}` {path}: no such folder, and no MM-GEM repo of that name could be loaded from the Hub "
            f"({one_line(error)[:300]})."
        ) from error
    with checking_user_input():
        check_tokenizer_matches(config, processor.tokenizer, argument)
        if local:
            check_weight_shapes(path, config, argument)
    return MMGEMModel.from_pretrained(str(path), config=config), processor


def check_weight_shapes(folder: str | os.PathLike[str], config: Any, argument: str = "model") -> None:
    """Raise a ValueError naming the weights whose shapes in the folder's safetensors files differ from the model
    that config.json describes (read from the files' headers; no weight is loaded)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, argument).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = [folder / "model.safetensors"]
    files = [f for f in files if f.is_file()]
    if not files or is_deepspeed_zero3_enabled():
        # Under DeepSpeed ZeRO-3 even a meta-device model is built partitioned (it gathers on init); the load that
        # follows reports weights of other shapes itself.
        return
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {key: tuple(value.shape) for key, value in MMGEMModel(config).state_dict().items()}
    wrong = []
    for file in files:
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():
                shape = tuple(weights.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    wrong.append(f"{key} is {list(shape)} in {file.name}, {list(expected[key])} for config.json")
    if wrong:
        raise ValueError(
            f"`{argument}` {folder}: {len(wrong)} weight(s) do not have the shapes config.json describes, e.g. "
            f"{'; '.join(wrong[:3])} (the weights and config.json come from different models)."
        )


__all__ = [
    "check_hub_id",
    "check_model_folder",
    "check_tokenizer_matches",
    "check_weight_shapes",
    "foreign_code_references",
    "load_model",
]
