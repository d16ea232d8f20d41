"""Write an MM-GEM as one complete Hub folder (atomically, checked by a reload in a fresh process) and push it.

The folder holds everything a Hub repo needs: `config.json` with `auto_map`, safetensors weights (sharded with an
index when large), the remote-code files, the processor and tokenizer files, `generation_config.json`, the
sentence-transformers files and a model card (`README.md`) made with `huggingface_hub.ModelCard`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from mmgem.app.space import space_card_metadata, write_space_files
from mmgem.files import give_usual_mode
from mmgem.integrations.lora import mmgem_lora_config
from mmgem.integrations.sentence_transformers import write_sentence_transformers_files
from modeling_mmgem.utils_mmgem import DEFAULT_MAX_CAPTION_TOKENS

logger = logging.getLogger("mmgem.conversion")

VERIFY_SCRIPT = Path(__file__).with_name("verify_export.py")
PARENT_PID_ENV = "MMGEM_VERIFY_PARENT_PID"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "configuration_mmgem.py",
    "modeling_mmgem.py",
    "processing_mmgem.py",
    "loss_mmgem.py",
    "pipeline_mmgem.py",
    "processor_config.json",
    "tokenizer_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "README.md",
    "app.py",
)
PAPER = "https://arxiv.org/abs/2405.19333"
# What an export writes (see `write_folder`), as patterns of paths inside the folder: a push carries these only.
EXPORT_FILE_PATTERNS = (
    "*.json",  # configs, tokenizer, processor, sentence-transformers modules, weight indexes
    "*.safetensors",
    "*.py",  # the remote code (top level only: see `export_files`)
    "README.md",
    "*.jinja",  # chat templates
    "*.model",  # sentencepiece tokenizers
    "*.txt",  # merges / vocab files of some tokenizers
    "*.tiktoken",
    "*.onnx",  # `mmgem export-onnx` (text_model.onnx, vision_model.onnx)
    "*.onnx.data",  # their external weights, for models over 2 GB
)
# Remote files a push replaces even when this export does not have them (see `_stale_weight_deletions`).
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
# Hub model ids as stored in the local cache: .../models--{org}--{name}/snapshots/{revision}
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


class HubPushError(RuntimeError):
    """The Hub refused or failed a push (the message never contains the token)."""


# ---------------------------------------------------------------------------------------------- model card
@dataclass
class CardInfo:
    """What the model card says about where the model came from."""

    vision_model: str | None = None
    language_model: str | None = None
    base_models: list[str] = field(default_factory=list)
    license: str | None = None
    checkpoint: str | None = None  # None for a fresh (untrained) composition
    checkpoint_kind: str | None = None
    dropped_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repo_id: str | None = None


def hub_id_of(path_or_id: str | None) -> str | None:
    """The Hub id of a component: itself if it is an id, derived from a Hub cache snapshot path, else None."""
    if not path_or_id:
        return None
    if Path(path_or_id).exists():
        match = _CACHE_SNAPSHOT.search(Path(path_or_id).resolve().as_posix())
        return f"{match['org']}/{match['name']}" if match else None
    try:
        validate_repo_id(path_or_id)
    except HFValidationError:
        return None
    return path_or_id if "/" in path_or_id else None


def card_metadata_of(path_or_id: str | None) -> ModelCardData | None:
    """The metadata of a component's or base model's own README.md (local folders only; never downloads)."""
    if not path_or_id or not (Path(path_or_id) / "README.md").is_file():
        return None
    try:
        return ModelCard.load(Path(path_or_id) / "README.md").data
    except Exception:  # noqa: BLE001 - a malformed card must not stop the conversion
        return None


def first_card_metadata(sources: list[str | None]) -> ModelCardData | None:
    """The model card metadata of the first local source that has one (an earlier export keeps its base models)."""
    for source in sources:
        data = card_metadata_of(source)
        if data is not None:
            return data
    return None


def infer_license(sources: list[str | None], notes: list[str]) -> str:
    """The components' common license (from their local model cards), else "other" with a note."""
    licenses = {source: getattr(card_metadata_of(source), "license", None) for source in sources if source}
    found = {value for value in licenses.values() if value}
    if len(found) == 1 and all(licenses.values()):
        return found.pop()
    found_text = ", ".join(f"{source}: {value or 'unknown'}" for source, value in licenses.items())
    notes.append(
        f"License: set to 'other' because the components' licenses could not be read or differ ({found_text}); "
        "the terms of both components apply."
    )
    return "other"


# The model card of an exported folder: a Jinja template that `ModelCard.from_template` fills in.
CARD_TEMPLATE_FILE = Path(__file__).with_name("model_card.md")


def _display_source(path_or_id: str | None) -> str:
    """A component as the card shows it: a Hub link, or only the name of a local folder (no local paths in public)."""
    if not path_or_id:
        return "see the checkpoint"
    hub_id = hub_id_of(path_or_id)
    if hub_id:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    return f"a local folder `{Path(path_or_id).name}`"


def lora_recipe(model: Any) -> dict[str, Any]:
    """The LoRA settings the model card shows, as Python source: those of `mmgem_lora_config(model)`, the
    project's own recipe (so the card and the library never disagree)."""
    config = mmgem_lora_config(model)
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "modules_to_save": json.dumps(list(config.modules_to_save or [])),
        "trainable_token_indices": json.dumps(dict(config.trainable_token_indices or {})),
    }


def build_model_card(model: Any, info: CardInfo, model_name: str) -> ModelCard:
    """The README.md of the exported folder, through `ModelCard.from_template` (metadata + usage code)."""
    import transformers

    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="feature-extraction",
        license=info.license or "other",
        base_model=info.base_models or None,
        tags=[
            "mmgem",
            "multimodal",
            "image-text-retrieval",
            "image-captioning",
            "region-captioning",
            "sentence-transformers",
            "custom_code",
        ],
        **space_card_metadata(),  # the folder also runs as a Gradio Space (app.py)
    )
    dropped_prefixes = sorted({key.split(".")[0] for key in info.dropped_keys})
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE_FILE.read_text(encoding="utf-8"),
        model_name=model_name,
        paper=PAPER,
        untrained=info.checkpoint is None,
        checkpoint=info.checkpoint,
        checkpoint_kind=info.checkpoint_kind,
        vision_model=_display_source(info.vision_model),
        language_model=_display_source(info.language_model),
        grid=config.pool_grid_size,
        num_image_tokens=config.num_image_tokens,
        projection_type=config.projection_type,
        projection_dim=config.projection_dim,
        image_size=config.vision_config.image_size,
        patch_grid=config.patch_grid_size,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        notes=info.notes,
        repo_id=info.repo_id or f"path/to/{model_name}",
        lora=lora_recipe(model),
        dropped_count=len(info.dropped_keys),
        dropped_summary=", ".join(f"`{p}`" for p in dropped_prefixes),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )


# ---------------------------------------------------------------------------------------------- references
@torch.no_grad()
def export_references(model: Any, processor: Any, source: Any | None = None, seed: int = 0) -> dict[str, Any]:
    """Small tensors that the reloaded folder must reproduce. With `source` (a components `Reference`), the vision and
    LM entries are the SOURCE components' outputs, so the reload is compared with the originals directly."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    image = (torch.rand(47, 61, 3, generator=generator) * 255).to(torch.uint8)  # not square: resize and crop run
    text = "a photo of a red square on the left"
    pixel_values = processor(images=[Image.fromarray(image.numpy())])["pixel_values"]
    text_inputs = processor(text=[text])
    refs: dict[str, Any] = {
        "image": image,
        "text": text,
        "pixel_values": pixel_values,
        "text_input_ids": text_inputs["input_ids"],
        "dtype": str(dtype),
        "image_embeds": model.get_image_features(pixel_values.to(dtype)).pooler_output.float(),
        "text_embeds": model.get_text_features(**text_inputs).pooler_output.float(),
        "vision_hidden": model.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state.float(),
    }
    if source is not None:
        input_ids, vocab_size, logits = source.input_ids, source.vocab_size, source.logits
    else:
        vocab_size = model.config.text_config.vocab_size
        input_ids = torch.randint(0, vocab_size, (2, 12), generator=generator)
        logits = model.language_model(input_ids=input_ids, use_cache=False).logits
    refs.update(lm_input_ids=input_ids, vocab_size=int(vocab_size), lm_logits=logits[..., :vocab_size].float())
    return refs


def verify_in_subprocess(folder: Path, references: dict[str, Any]) -> dict[str, Any]:
    """Reload `folder` in a fresh Python (offline, without any token) and compare with `references`."""
    logger.info("Reloading %s in a fresh process (AutoModel, AutoProcessor, SentenceTransformer)", folder.name)
    with tempfile.TemporaryDirectory(prefix="mmgem-verify-") as scratch:
        reference_file = Path(scratch) / "references.pt"
        torch.save(references, reference_file)
        env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENV_VARS}
        env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        env["HF_TOKEN_PATH"] = str(Path(scratch) / "no-token")  # the check never needs, so never sees, a token
        env[PARENT_PID_ENV] = str(os.getpid())  # the check exits as soon as the conversion is gone (even SIGKILLed)
        result = subprocess.run(
            [sys.executable, str(VERIFY_SCRIPT), str(folder), str(reference_file)],
            capture_output=True,
            text=True,
            env=env,
        )
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"The exported folder failed its reload check in a fresh process:\n{tail}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    logger.info(
        "Reload check passed: %s (%s), vision max diff %.2g, LM max diff %.2g, sentence-transformers dim %d, "
        "peak RSS of the check %s GiB",
        summary["class"],
        summary["dtype"],
        summary["vision_max_diff"],
        summary["lm_max_diff"],
        summary["sentence_transformers_dim"],
        summary.get("peak_rss_gib"),
    )
    return summary


# ---------------------------------------------------------------------------------------------- writing
def check_output_dir(output_dir: Path, overwrite: bool, inputs: list[str | None]) -> None:
    """ValueErrors (naming `output_dir`) before any work: existing output, or output overlapping an input."""
    resolved = output_dir.resolve()
    for source in inputs:
        if source and Path(source).exists():
            source_path = Path(source).resolve()
            if resolved == source_path or resolved in source_path.parents:
                raise ValueError(f"`output_dir` {str(output_dir)!r} would replace the input {source!r}.")
    if output_dir.is_file():
        raise ValueError(f"`output_dir` {str(output_dir)!r} is a file.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"`output_dir` {str(output_dir)!r} exists and is not empty; pass overwrite (--overwrite).")
        if not (output_dir / "config.json").is_file():
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} is not a model folder (no config.json): refusing to replace it "
                "even with --overwrite."
            )


def _leftover_owner(entry: Path, prefix: str) -> int | None:
    """The process id a `.NAME.partial-PID-*` / `.NAME.old-PID-*` folder was made by (None: unknown)."""
    owner = entry.name[len(prefix) :].split("-", 1)[0]
    return int(owner) if owner.isdigit() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_leftovers(output_dir: Path) -> list[Path]:
    """Remove what killed conversions into `output_dir` left next to it; returns what was removed or restored.

    A conversion writes into `.NAME.partial-PID-*` and moves the previous output aside as `.NAME.old-PID-*` while it
    swaps; a SIGKILL leaves them behind. Those of live processes (a conversion running now) are kept. When the kill
    came between the two renames of the swap, the output is missing and its `.old-` copy is moved back instead.
    """
    handled = []
    for kind in ("old", "partial"):  # restore a previous output before anything else is deleted
        prefix = f".{output_dir.name}.{kind}-"
        for entry in sorted(output_dir.parent.glob(f"{glob.escape(prefix)}*")):
            owner = _leftover_owner(entry, prefix)
            if not entry.is_dir() or (owner is not None and owner != os.getpid() and _process_alive(owner)):
                continue
            if kind == "old" and not output_dir.exists():
                entry.rename(output_dir)
                logger.warning("Restored %s from %s (a conversion was killed while replacing it)", output_dir, entry)
            else:
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("Removed %s, left by a killed conversion", entry.name)
            handled.append(entry)
    return handled


@contextlib.contextmanager
def staging_folder(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `output_dir` that replaces it only if the block succeeds (else it is deleted)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield staging
        _move_into_place(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:  # appeared while converting
            raise FileExistsError(f"`output_dir` {output_dir} appeared during the conversion; nothing was replaced.")
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        output_dir.rename(old)
        try:
            staging.rename(output_dir)
        except BaseException:
            old.rename(output_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if output_dir.exists():
            output_dir.rmdir()  # empty
        staging.rename(output_dir)


def set_caption_length(model: Any, max_new_tokens: int = DEFAULT_MAX_CAPTION_TOKENS) -> None:
    """Give `generate` a caption-sized default: without one, transformers falls back to a model-agnostic 20 tokens
    (and warns at every call), short for MM-GEM's long captions. A length the generation config already sets is
    kept."""
    generation_config = model.generation_config
    if generation_config.max_new_tokens is None and generation_config.max_length in (None, 20):
        generation_config.max_new_tokens = max_new_tokens
        generation_config._from_model_config = False  # now a real generation config, saved as such


def write_folder(model: Any, processor: Any, folder: Path, card: ModelCard, max_shard_size: int | str) -> None:
    """Every file of the Hub repo, in `folder`."""
    set_caption_length(model)
    logger.info("Saving the weights and remote code (shards of at most %s)", max_shard_size)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    give_usual_mode(folder.glob("*.safetensors"))  # written 0600; every other file of the folder is 0644
    logger.info("Saving the processor, the sentence-transformers files and the model card")
    processor.save_pretrained(folder)
    write_sentence_transformers_files(folder)
    write_space_files(folder)
    card.save(folder / "README.md")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if missing or not has_weights:
        raise RuntimeError(f"The exported folder lacks {missing + ([] if has_weights else ['model.safetensors'])}.")


def publish(
    holder: Any,
    output_dir: Path,
    card_info: CardInfo,
    *,
    source_reference: Any | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write `holder.model` / `holder.processor` to `output_dir` atomically; the model is released (holder.model =
    None) once saved, so the reload check in a fresh process does not run beside a second copy of the weights."""
    references = export_references(holder.model, holder.processor, source_reference) if verify else None
    model_name = card_info.repo_id.split("/")[-1] if card_info.repo_id else output_dir.name
    card = build_model_card(holder.model, card_info, model_name)
    with staging_folder(output_dir, overwrite) as staging:
        write_folder(holder.model, holder.processor, staging, card, max_shard_size)
        holder.model = None
        gc.collect()
        if verify:
            verify_in_subprocess(staging, references)
    logger.info("Wrote %s", output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------- pushing
def resolve_token(token: str | None = None) -> str:
    """The token to push with: given, else the usual places (HF_TOKEN, the login cache)."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "`push_to_hub` needs a Hugging Face token with write access and none was found: set HF_TOKEN or run "
            "`hf auth login`."
        )
    return token


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`push_to_hub` {repo_id!r} is not a valid repo id ('user/name'): {error}") from error


def _push_error(error: Exception, repo_id: str, token: str) -> HubPushError:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(error, "server_message", None) or ""
    if isinstance(error, RepositoryNotFoundError):
        message = (
            f"The Hub has no repo {repo_id!r} that this token can see (HTTP {status}), and it was not created: check "
            "the namespace (your user name or an organisation you belong to)."
        )
    elif status == 401:
        message = "The Hub rejected the token (HTTP 401): check HF_TOKEN or run `hf auth login` again."
    elif status == 403:
        message = (
            f"The Hub refused the push to {repo_id!r} (HTTP 403): the token has no write access to that repo or "
            "namespace (a read-only token, or another user's namespace)."
        )
    else:
        message = f"Pushing to {repo_id!r} failed: {type(error).__name__} {status or ''} {server}".strip()
    return HubPushError(message.replace(token, "***"))


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """Before a long conversion: a valid repo id and a token the Hub accepts. Returns the token."""
    check_repo_id(repo_id)
    token = resolve_token(token)
    try:
        HfApi(token=token).whoami()
    except (HfHubHTTPError, OSError) as error:
        raise _push_error(error, repo_id, token) from None
    return token


def _stale_weight_deletions(api: HfApi, repo_id: str, uploading: set[str]) -> list[Any]:
    """Deletions of weight files an earlier push left that this one does not replace (a stale `model.safetensors`
    next to a new sharded index would be loaded instead of it). Other files in the repo are left alone."""
    existing = api.list_repo_files(repo_id, repo_type="model")
    stale = [
        path
        for path in existing
        if path not in uploading and any(fnmatch.fnmatch(path, pattern) for pattern in WEIGHT_FILE_PATTERNS)
    ]
    if stale:
        logger.info("Deleting %d stale weight files from %s: %s", len(stale), repo_id, ", ".join(stale))
    return [CommitOperationDelete(path_in_repo=path) for path in stale]


def export_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(files of `folder` a push carries, what is left out).

    Only regular files an export writes (`EXPORT_FILE_PATTERNS`; `.py` files at the top level only): never a
    symlink (its target may lie anywhere), nothing hidden (`.env`, `.git/`, `.cache/`), no stray notes or logs.
    """
    carried, skipped = [], set()
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        hidden = next((part for part in relative.parts if part.startswith(".") or part == "__pycache__"), None)
        if hidden is not None:
            skipped.add(hidden)  # a hidden folder is named once, not file by file
        elif path.is_dir() and not path.is_symlink():
            continue
        elif path.is_symlink() or not path.resolve().is_relative_to(root) or not _written_by_export(relative):
            skipped.add(relative.as_posix())
        else:
            carried.append(path)
    return carried, sorted(skipped)


def _written_by_export(relative: Path) -> bool:
    if relative.suffix == ".py" and len(relative.parts) > 1:
        return False
    return any(fnmatch.fnmatch(relative.name, pattern) for pattern in EXPORT_FILE_PATTERNS)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create `repo_id` if needed (`create_repo(exist_ok=True)`) and upload the exported `folder` in ONE commit
    (large files go through LFS / xet as with `upload_folder`). Returns the commit URL.

    The token comes from `token` or the usual places (HF_TOKEN, `hf auth login`); it is never printed or written.

    Raises:
        ValueError: invalid repo id, no token, or `folder` is not an exported MM-GEM folder.
        HubPushError: the Hub refused the push (bad token, no write access, unknown namespace, ...).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise ValueError(f"`folder` {str(folder)!r} is not an exported MM-GEM folder (config.json and README.md).")
    token = resolve_token(token)
    files, skipped = export_files(folder)
    if skipped:
        logger.warning("Not pushing %d file(s) the export did not write: %s", len(skipped), ", ".join(skipped[:20]))
    size = sum(p.stat().st_size for p in files) / 1e6
    api = HfApi(token=token)
    logger.info("Uploading %d files (%.1f MB) to %s/%s in one commit", len(files), size, api.endpoint, repo_id)
    # `create_commit` with every file is `upload_folder`'s single-commit path. `upload_folder` itself, with hf_xet
    # installed, streams large or slow uploads in several commits ("part N"); a published model is one commit.
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p) for p in files
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations += _stale_weight_deletions(api, repo_id, {op.path_in_repo for op in operations})
        commit = api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=operations,
            commit_message=commit_message or "Upload MM-GEM converted with mmgem",
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise _push_error(error, repo_id, token) from None
    logger.info("Pushed to %s", commit.commit_url)
    return commit.commit_url
