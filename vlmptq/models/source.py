"""Where a model comes from: a local folder, or a Hugging Face Hub id (``Qwen/Qwen2.5-VL-7B-Instruct``)
resolved through the Hugging Face cache, downloading what is missing when the Hub can be reached.

Only what a run reads is fetched: config and tokenizer / processor files and the safetensors weights
(``*.bin`` only for repositories without safetensors), at the top of the repository (transformers reads
nothing else from a model folder); never remote code, other formats or subfolders (onnx/, gguf/, ...).
``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` and ``HF_TOKEN`` work as everywhere in the Hugging Face tools.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from vlmptq.errors import ConfigError

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SIDE_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # config, processor, tokenizer; no code
WEIGHTS = ["*.safetensors"]
FALLBACK_WEIGHTS = ["*.bin"]
SUBFOLDERS = ["*/*"]  # huggingface_hub's patterns are fnmatch's: "*" matches "/" too


def model_dir_of(model: str | Path, *, config_only: bool = False) -> Path:
    """The local folder of ``model`` (a folder, or a Hub id taken from the cache or fetched) once its
    architecture is known to be supported: an unknown one fails before any weights are read or
    downloaded. ``config_only``: the weights are not needed (``--dry-run``)."""
    from vlmptq.models.adapters import adapter_for_type, read_model_type

    config_dir = resolve_model(model, config_only=True)
    adapter_for_type(read_model_type(config_dir))
    if config_only:
        return config_dir
    folder = resolve_model(model)
    check_weight_files(folder)
    return folder


def check_weight_files(folder: Path) -> None:
    """The model's weights are in ``folder`` and readable: every safetensors file (every shard its index
    lists) is there and its header parses and fits the file. Milliseconds: the tensors are read later, and a
    truncated file fails here by name instead of inside transformers' loader."""
    from vlmptq.checkpoint.reader import TensorStore

    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        TensorStore(folder, what="model")
    elif not any(folder.glob("*.bin")):
        raise ConfigError(f"{folder} holds no weights (model.safetensors, its shards and index, or pytorch_model.bin): "
                          "copy them into the folder, or pass the model's Hub id")


def resolve_model(model: str | Path, *, config_only: bool = False, role: str = "--model") -> Path:
    """The local folder of ``model``: the folder itself, or the cached snapshot of a Hub id (fetched if
    missing). ``config_only``: the configuration files are enough (``--dry-run``). ``role``: how errors
    name it (``--model``, ``checkpoint``)."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{role} {model} is a file; pass the model's folder (with config.json and its "
                              "weights) or a Hugging Face Hub id")
        return path
    name = str(model)
    if not REPO_ID.match(name):  # "org/name"; local-looking paths (./x, /x, ~/x) never match
        raise ConfigError(f"{role} {model} does not exist; pass a local Hugging Face model folder or a Hub id "
                          "such as Qwen/Qwen2.5-VL-7B-Instruct")
    folder = _snapshot(name, SIDE_FILES if config_only else SIDE_FILES + WEIGHTS, role)
    if not config_only and not any(folder.glob("*.safetensors")):
        folder = _snapshot(name, SIDE_FILES + FALLBACK_WEIGHTS, role)
    logger.info("model %s: %s (Hugging Face cache)", name, folder)
    return folder


def _snapshot(repo_id: str, patterns: list[str], role: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=SUBFOLDERS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(
            f"{role} {repo_id} is not a local folder and could not be taken from the Hugging Face Hub or its "
            f"cache {constants.HF_HUB_CACHE}{offline}: {type(e).__name__}: {_first_line(e)}. Download it where "
            f"the Hub can be reached (`hf download {repo_id}`, into the same cache or a folder you then pass), "
            "or check the id and your HF_TOKEN for gated models"
        ) from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no detail"
