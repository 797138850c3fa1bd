"""Sources given by path: the user's own checkpoint.

- a Hugging Face folder: `config.json` plus `*.safetensors` (or a sharded
  `model.safetensors.index.json`), tokenizer files, `generation_config.json`;
- a sentence-transformers folder: the same, plus `modules.json`, whose Pooling module
  (`1_Pooling/config.json`) gives the pooling (mean, CLS, max, last token) and whose
  Normalize module the L2 normalisation;
- a `.gguf` file of any architecture transformers' GGUF loader reads (dequantized to fp32);
- a transformers model object with its tokenizer (`module_loaded`).

The task is inferred (`--task` overrides it): a `*ForCausalLM` / `*LMHeadModel` is a causal
LM, a `*ForSequenceClassification` a classifier or cross-encoder, a sentence-transformers
folder or a bare encoder (`BertModel`) an embedding model.

A model folder is data, never code: `trust_remote_code` is never set, a config whose
`auto_map` asks for custom code is refused, pickle checkpoints (`pytorch_model.bin`) are
refused unless `allow_pickle`, and every file is checked (JSON parses, safetensors headers
and sizes agree, the weights the index names exist) before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.models.sources import Loaded, Source, causal_lm_loaded, classifier_loaded, embedding_loaded, quiet_third_party

TASKS = ("causal-lm", "embedding", "sequence-classification")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}
ST_SUPPORTED = ("Transformer", "Pooling", "Normalize")
# Config keys that name the longest sequence a model supports, in the order transformers' families use them.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length")


class ModelFolderError(KilnError):
    pass


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated download fails here)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelFolderError(f"{path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8 or n > 100 << 20:
                raise ModelFolderError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: corrupt safetensors header") from exc
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if not ends:
        raise ModelFolderError(f"{path}: the safetensors file holds no tensors")
    if 8 + n + max(ends) != size:
        raise ModelFolderError(f"{path}: truncated safetensors file ({size} bytes, its header describes "
                               f"{8 + n + max(ends)})")


def weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The checkpoint's weight files and whether they are safetensors; checked, or refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        mapping = read_json(index, "the safetensors index").get("weight_map")
        if not isinstance(mapping, dict) or not mapping:
            raise ModelFolderError(f"{index}: no weight_map")
        files = []
        for name in sorted(set(mapping.values())):
            p = (folder / name).resolve()
            if p.parent != folder.resolve():
                raise ModelFolderError(f"{index}: names a file outside the folder: {name}")
            if not p.is_file():
                raise ModelFolderError(f"{index}: names {name}, which is missing")
            files.append(p)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        for f in files:
            check_safetensors(f)
        return files, True
    pickles = sorted(folder.glob("pytorch_model*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if pickles:
        if not allow_pickle:
            raise ModelFolderError(f"{folder}: the weights are a pickle ({pickles[0].name}), which can run code when "
                                   "loaded; convert them to safetensors, or pass --allow-pickle if you trust the file")
        return pickles, False
    raise ModelFolderError(f"{folder}: no weights (*.safetensors, or pytorch_model.bin with --allow-pickle)")


def max_positions(config) -> int | None:
    """The longest sequence the config supports: its position limit, stretched by RoPE scaling
    where the config names the original length and a factor."""
    limit = next((getattr(config, k) for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)
    scaling = getattr(config, "rope_scaling", None) or {}
    original, factor = scaling.get("original_max_position_embeddings"), scaling.get("factor")
    if isinstance(original, int) and isinstance(factor, (int, float)) and factor > 1:
        limit = max(limit or 0, int(original * factor))
    return limit


def padded_positions_limit(model, limit: int | None) -> int | None:
    """RoBERTa-style embeddings (XLM-R, CamemBERT, MPNet, ...) number positions from padding_idx + 1,
    so their position table, which keeps a padding row, holds padding_idx + 1 positions fewer than
    its size: found from the table itself, whatever the architecture is called."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding) \
                and module.padding_idx is not None:
            usable = module.num_embeddings - module.padding_idx - 1
            limit = usable if limit is None else min(limit, usable)
    return limit


def attention_windows(config) -> list[int]:
    """Sliding windows the config declares and uses (shorter than its position limit)."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    windows = [w for w in (window, getattr(config, "attention_window", None)) if isinstance(w, int) and w > 0]
    limit = max_positions(config)
    return sorted({w for w in windows if limit is None or w < limit})


def infer_task(architectures: list[str], sentence_transformers: bool) -> str | None:
    if sentence_transformers:
        return "embedding"
    arch = architectures[0] if architectures else ""
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if arch.endswith("Model"):
        return "embedding"
    return None


def sentence_transformers_info(folder: Path) -> dict | None:
    """Pooling and normalisation from a sentence-transformers folder, or None if it is not one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = read_json(modules_file, "modules.json")
    if not isinstance(modules, list):
        raise ModelFolderError(f"{modules_file}: not a list of modules")
    info: dict[str, Any] = {"pooling": "mean", "normalize": False}
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
        if kind not in ST_SUPPORTED:
            raise ModelFolderError(f"{modules_file}: the sentence-transformers module {kind or m!r} is not supported "
                                   f"(kiln compiles {', '.join(ST_SUPPORTED)})")
        if kind == "Transformer" and str(m.get("path", "")) not in ("", "."):
            raise ModelFolderError(f"{modules_file}: the Transformer module lives in a subfolder ({m['path']}); "
                                   "give that folder")
        if kind == "Normalize":
            info["normalize"] = True
        if kind == "Pooling":
            cfg_file = folder / str(m.get("path", "1_Pooling")) / "config.json"
            cfg = read_json(cfg_file, "the pooling config") if cfg_file.is_file() else {"pooling_mode_mean_tokens": True}
            on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            if len(on) != 1 or on[0] not in POOLING_MODES:
                raise ModelFolderError(f"{cfg_file}: pooling {on or 'none'} is not supported "
                                       f"(kiln pools by one of {', '.join(POOLING_MODES.values())})")
            info["pooling"] = POOLING_MODES[on[0]]
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        length = read_json(st_config, "sentence_bert_config.json").get("max_seq_length")
        if isinstance(length, int):
            info["max_sequence_length"] = length
    return info


def _special_id(tokenizer, config: dict, key: str) -> int | None:
    token = config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def folder_tokenizer(folder: Path) -> tuple[str | None, str | None, Any]:
    """(tokenizer.json text, chat template, special ids and length limit) from a folder, if it has
    a tokenizer. A tokenizer.json is taken as it is; older formats are converted by transformers."""
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file, "tokenizer_config.json") if config_file.is_file() else {}
    if "auto_map" in config:
        raise ModelFolderError(f"{config_file}: auto_map asks for custom tokenizer code, which kiln never runs")
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not isinstance(template, str):
        template = None  # a list of named templates: none is the default one kiln could pick
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").is_file():
        text = (folder / "tokenizer.json").read_text()
    elif any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")):
        from transformers import AutoTokenizer

        try:
            converted = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            text = converted.backend_tokenizer.to_str()
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one line is what the user needs
            raise ModelFolderError(f"{folder}: cannot convert the tokenizer to tokenizer.json: {_first_line(exc)}") from exc
    else:
        return None, None, None
    try:
        tokenizer = Tokenizer.from_str(text)
        tokenizer.encode("kiln checks the tokenizer")
    except Exception as exc:  # noqa: BLE001
        raise ModelFolderError(f"{folder}: the tokenizer does not load: {_first_line(exc)}") from exc
    limit = config.get("model_max_length")
    special = SimpleNamespace(**{f"{k}_token_id": _special_id(tokenizer, config, f"{k}_token") for k in ("eos", "bos", "pad")},
                              model_max_length=limit if isinstance(limit, int) else None)
    return text, template, special


def _generation(model, tok, chat_template: str | None) -> dict:
    """eos/bos/pad ids and sampling defaults, from generation_config.json, the config and the tokenizer."""
    gen = getattr(model, "generation_config", None)
    cfg = model.config
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else getattr(cfg, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    if tok is not None:
        eos_ids.add(tok.eos_token_id)
    eos_ids.discard(None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None and tok is not None:
        pad = tok.pad_token_id
    bos = getattr(cfg, "bos_token_id", None) if tok is None else tok.bos_token_id
    out = {"eos_token_ids": sorted(eos_ids), "bos_token_id": bos,
           "pad_token_id": pad if pad is not None else (min(eos_ids) if eos_ids else None),
           "chat_template": chat_template}
    if gen is not None:
        defaults = {k: getattr(gen, k, None) for k in ("temperature", "top_p", "top_k")}
        if getattr(gen, "do_sample", False):
            out["defaults"] = {k: v for k, v in defaults.items() if v is not None}
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def build_loaded(model, task: str, tokenizer_json: str | None, tok, extra: dict, st: dict | None = None,
                 chat_template: str | None = None) -> Loaded:
    """The Loaded for a transformers model of `task`, with everything the manifest needs."""
    cfg = model.config
    limit = padded_positions_limit(model, max_positions(cfg))
    meta = {"model_type": getattr(cfg, "model_type", None), "max_positions": limit,
            "attention_windows": attention_windows(cfg), **extra}
    if task == "causal-lm":
        return causal_lm_loaded(model, tokenizer_json, _generation(model, tok, chat_template), meta)
    st = st or {"pooling": "mean", "normalize": False}
    limit = min((n for n in (st.get("max_sequence_length"), meta["max_positions"]) if n), default=None)
    if isinstance(getattr(tok, "model_max_length", None), int) and tok.model_max_length < 10**6:
        limit = min(limit or tok.model_max_length, tok.model_max_length)
    meta["max_sequence_length"] = limit
    if task == "embedding":
        return embedding_loaded(model, tokenizer_json, {**meta, "pooling": st["pooling"], "normalize": st["normalize"]})
    return classifier_loaded(model, tokenizer_json, meta)


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _moe_kwargs(config: dict) -> dict:
    """Mixture-of-experts layers run each token's chosen experts as batched matmuls: that form
    exports (transformers' default grouped_mm is a custom op, its eager loop data-dependent)."""
    if any(isinstance(config.get(k), int) and config[k] > 1 for k in MOE_KEYS):
        return {"experts_implementation": "batched_mm"}
    return {}


def _auto_class(task: str):
    import transformers

    return {"causal-lm": transformers.AutoModelForCausalLM, "embedding": transformers.AutoModel,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ModelFolderError(f"unknown task '{task}' (known: {', '.join(TASKS)})")


def folder_source(folder: Path, *, task: str | None = None, allow_pickle: bool = False) -> Source:
    """A Source for a Hugging Face or sentence-transformers folder; everything cheap is checked now."""
    _check_task(task)
    folder = folder.resolve()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"{folder}: no config.json (a model folder holds config.json and its weights)")
    config = read_json(config_file, "config.json")
    if not isinstance(config, dict):
        raise ModelFolderError(f"{config_file}: not a JSON object")
    if "auto_map" in config:
        raise ModelFolderError(f"{config_file}: auto_map asks for custom model code (trust_remote_code), "
                               "which kiln never runs")
    if not isinstance(config.get("model_type"), str):
        raise ModelFolderError(f"{config_file}: no model_type")
    files, safe = weight_files(folder, allow_pickle)
    st = sentence_transformers_info(folder)
    architectures = config.get("architectures") or []
    inferred = infer_task(architectures, st is not None)
    task = task or inferred
    if task is None:
        raise ModelFolderError(f"{config_file}: cannot tell the task of a {architectures[0] if architectures else config['model_type']} "
                               f"(give --task: {', '.join(TASKS)})")

    def fingerprint() -> str:
        h = hashlib.sha256(task.encode())
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                h.update(str(p.relative_to(folder)).encode())
                if p in files:  # weights: size and header, not gigabytes of bytes
                    stat = p.stat()
                    h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
                    with open(p, "rb") as f:
                        h.update(f.read(1 << 16))
                else:
                    h.update(p.read_bytes())
        return h.hexdigest()

    def load() -> Loaded:
        quiet_third_party()
        tokenizer_json, chat_template, tok = folder_tokenizer(folder)
        try:
            model = _auto_class(task).from_pretrained(folder, dtype=torch.float32, trust_remote_code=False,
                                                      use_safetensors=safe, **_moe_kwargs(config)).eval()
        except Exception as exc:  # noqa: BLE001
            raise ModelFolderError(f"{folder}: transformers cannot load it as a {task} model: {_first_line(exc)}") from exc
        extra = {"weights": "safetensors" if safe else "pickle (--allow-pickle)"}
        return build_loaded(model, task, tokenizer_json, tok, extra, st, chat_template)

    return Source(_safe_name(folder.name), task, f"{folder.name} ({', '.join(architectures) or config['model_type']})",
                  None, fingerprint, load, folder)


def gguf_source(path: Path, *, task: str | None = None) -> Source:
    """A Source for a .gguf file, dequantized to fp32 by transformers' GGUF loader."""
    _check_task(task)
    if task not in (None, "causal-lm"):
        raise ModelFolderError(f"{path}: a GGUF file compiles as a causal-lm, not {task}")
    path = path.resolve()
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if magic != b"GGUF":
        raise ModelFolderError(f"{path}: not a GGUF file (bad magic)")
    arch = _gguf_architecture(path)
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch not in GGUF_CONFIG_MAPPING:
        raise ModelFolderError(f"{path}: GGUF architecture '{arch}' is not one transformers' GGUF loader reads "
                               f"({', '.join(k for k in GGUF_CONFIG_MAPPING if k not in ('general', 'tokenizer'))})")

    def fingerprint() -> str:
        from kiln.manifest import sha256_file

        return sha256_file(path)

    def load() -> Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_third_party()
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001
            raise ModelFolderError(f"{path}: transformers cannot load the GGUF file: {_first_line(exc)}") from exc
        return build_loaded(model, "causal-lm", tok.backend_tokenizer.to_str(), tok,
                            {"weights": f"gguf ({arch}) dequantized to fp32"}, chat_template=tok.chat_template)

    def blocks():
        from kiln.models.gguf_blocks import GGUFBlocks

        return GGUFBlocks(path)

    return Source(_safe_name(path.stem), "causal-lm", f"{path.name} (GGUF, {arch})", None, fingerprint, load, path,
                  blocks)


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways inside the reader
        raise ModelFolderError(f"{path}: corrupt GGUF file: {_first_line(exc)}") from exc


def tokenizer_text(tokenizer) -> str | None:
    """tokenizer.json text of a transformers fast tokenizer or a `tokenizers.Tokenizer` (None for None)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise ModelFolderError("the tokenizer has no fast (tokenizers) form that a runtime can read")
    return backend.to_str()


def module_loaded(model, tokenizer=None, task: str | None = None) -> Loaded:
    """A Loaded for a transformers model object (and optionally its transformers tokenizer)."""
    _check_task(task)
    task = task or infer_task([type(model).__name__], False)
    if task is None:
        raise ModelFolderError(f"cannot tell the task of a {type(model).__name__} (give task=: {', '.join(TASKS)})")
    tokenizer_json = tokenizer_text(tokenizer)
    tok = tokenizer if hasattr(tokenizer, "eos_token_id") else None  # a transformers tokenizer, not a bare one
    return build_loaded(model.float().eval(), task, tokenizer_json, tok, {"weights": "in memory"},
                        chat_template=getattr(tok, "chat_template", None))


def module_fingerprint(model) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().numpy().tobytes())
    return h.hexdigest()


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "model"


def path_source(path: Path, *, task: str | None = None, allow_pickle: bool = False) -> Source:
    """The Source for a model given by path: a folder or a .gguf file."""
    if path.is_dir():
        return folder_source(path, task=task, allow_pickle=allow_pickle)
    if path.suffix.lower() == ".gguf":
        return gguf_source(path, task=task)
    if not path.exists():
        raise ModelFolderError(f"{path}: no such file or folder")
    raise ModelFolderError(f"{path}: not a model folder, a .gguf or an .onnx file")
