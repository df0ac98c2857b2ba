"""transformers' loaders with typed errors: a model directory whose config or tokenizer files
transformers cannot make sense of is the user's input to fix, named as such, not "a bug"."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, TiesMergeError
from ..limits import read_json

__all__ = ["align_pad_token", "check_vocabulary", "config_num_labels", "config_vocab_size", "converted_on_load",
           "from_pretrained", "input_rows", "is_encoder_decoder", "refuse_converted", "refuse_multi_label"]


def _check_config(directory: Path) -> int | None:
    """What transformers would fetch or need beyond the folder, refused before it is asked to: an attention
    implementation named as a Hub repo (``kernels-community/...``: code downloaded and run), and a quantized
    checkpoint (its weights are not the model's values; bitsandbytes/GPTQ packages would be needed). Returns how
    many values the weights store (None where they cannot be read: their own errors come when they are)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    config = read_json(path, "the model's config")
    if not isinstance(config, dict):
        return None  # transformers' own message names it
    for name in ("config.json", "tokenizer_config.json"):  # transformers would fall back to its standard class, a
        # model other than the one the folder declares (hostile pass 26, N8), or ask to run the code: refused first
        data = config if name == "config.json" else _json_object(directory / name)
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            named = sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])})
            raise CheckpointError(f"{directory / name}: auto_map names code shipped with the model "
                                  f"({', '.join(named)[:160]}); tiesmerge never runs a model's own code, and "
                                  "transformers' standard class would be another model than the one declared",
                                  hint="use a model whose architecture and tokenizer transformers ships, or remove "
                                       "the auto_map entries if the standard classes fit")
    for key in ("_attn_implementation", "attn_implementation"):
        value = config.get(key)
        if isinstance(value, str) and "/" in value:
            raise CheckpointError(f"{path}: {key} = {value!r} names a kernel on the Hugging Face Hub; tiesmerge never "
                                  f"downloads or runs a model's code",
                                  hint=f"remove {key} from config.json (transformers then picks a built-in one)")
    stored = _check_sizes(directory, path, config)
    if config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method", "?") \
            if isinstance(config["quantization_config"], dict) else "?"
        raise CheckpointError(f"{path}: the model is quantized ({method}); its stored weights are not the values "
                              f"statistics and evaluation need",
                              hint="use the unquantized model (merging quantized checkpoints is not supported)")
    return stored


def _json_object(path: Path) -> dict | None:
    """A JSON object file of the model folder, or None where there is none (or it holds something else: the
    loader's own checks name that)."""
    if not path.is_file():
        return None
    try:
        data = read_json(path, f"the model's {path.name}")
    except CheckpointError:
        return None
    return data if isinstance(data, dict) else None


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.([0-9]{1,9})\.")  # ASCII, bounded: int() never fails
# every key a config sizes a stack of layers by (encoder-decoders' too: num_decoder_layers 100000 made the meta
# build of _check_built run for minutes, hp35 E1), at the top level and in nested configs (text_config, ...)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers",
               "encoder_layers", "num_encoder_layers")
_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "vocab_size")  # vocab_size: the embedding's rows (hp33 next)
# positions a config may claim: the longest contexts models ship (10M tokens) and some room; transformers sizes
# position tables and rotary caches by it (1e9 took gigabytes before the weights were read)
MAX_POSITIONS = 1 << 24
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def _check_sizes(directory: Path, path: Path, config: dict) -> int | None:
    """A config describing a far larger model than its weights (``num_hidden_layers: 2000000`` beside 2 layers, a
    hidden size no weight has) makes transformers build it, layer by layer, for minutes and gigabytes before the
    weights are compared: refused first, from the weights' headers alone. Returns how many values they store."""
    from ..io.checkpoint import open_checkpoint

    try:
        ckpt = open_checkpoint(directory, label=str(directory))
        names = ckpt.names()
        shapes = {d for n in names for d in ckpt.info(n).shape}
        stored = sum(math.prod(ckpt.info(n).shape) for n in names)
        ckpt.close()
    except TiesMergeError:
        return None  # the weights' own problems are named when they are read
    layers = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    nested = [(f"{k}.", v) for k, v in config.items() if isinstance(v, dict)]
    for prefix, part in [("", config), *nested]:
        for key in _LAYER_KEYS:
            value = part.get(key)
            if layers and isinstance(value, int) and not isinstance(value, bool) and value > max(layers) + 1:
                raise CheckpointError(f"{path}: {prefix}{key} = {value:,}, but the weights hold {max(layers) + 1:,} "
                                      f"layers (0..{max(layers)}); the rest would be built from nothing",
                                      hint=f"set {prefix}{key} to the weights' layer count (the config must describe "
                                           "these weights)")
    for key in _POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_POSITIONS:
            raise CheckpointError(f"{path}: {key} = {value:,}, more positions than any model takes (at most "
                                  f"{MAX_POSITIONS:,} are read); transformers sizes tables by it",
                                  hint=f"set {key} to the model's context length (the config must describe the model)")
    labels = config.get("num_labels")
    if shapes and isinstance(labels, int) and not isinstance(labels, bool) and labels > max(shapes):
        raise CheckpointError(  # transformers builds an id2label of that many entries first (hostile pass 33, C99)
            f"{path}: num_labels = {labels:,}, more than any dimension of the weights ({max(shapes):,}): no head of "
            "these weights has that many classes, and transformers would build a table of that many labels",
            hint="set num_labels to the number of classes of the model's head (the config must describe these "
                 "weights)")
    for key in _WIDTH_KEYS:
        value = config.get(key)
        if shapes and isinstance(value, int) and not isinstance(value, bool) and value not in shapes:
            raise CheckpointError(f"{path}: {key} = {value:,}, a width no tensor of the weights has",
                                  hint=f"set {key} to the weights' width (the config must describe these weights)")
    return stored


# values a built model may hold beyond those its weights store: a head or pooler made afresh (a classifier on an
# encoder's checkpoint), an output layer the file keeps once for two tied uses
BUILT_SLACK = 1 << 22


def _built_on_meta(loader: Any, directory: Path) -> Any:
    """The model config.json describes, built on the meta device (no memory, no values), or None where transformers
    cannot build it. A function choosing its class (the LM evaluators') builds the backbone alone."""
    import torch
    from transformers import AutoConfig, AutoModel

    build = getattr(loader, "from_config", None) or AutoModel.from_config
    try:
        with _transformers_quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
            with torch.device("meta"):
                return build(config)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - the caller's own words say what cannot be loaded
        return None


def _check_built(loader: Any, directory: Path, stored: int) -> None:
    """Build the model config.json describes on the meta device (no memory, no values) and refuse it when it holds
    far more parameters than the weights store: transformers allocates the whole model before it compares shapes,
    so a config claiming ``intermediate_size: 200000000`` beside 32-wide weights took 24 GB and the machine's
    OOM killer (hostile pass 34, D21). One check of every field that sizes a tensor, named or not."""
    model = _built_on_meta(loader, directory)
    if model is None:  # what transformers cannot build, from_pretrained names in its own words
        return
    built = sum(p.numel() for p in model.parameters())  # a tied parameter once
    if built > 2 * stored + BUILT_SLACK:
        name, largest = max(model.named_parameters(), key=lambda item: item[1].numel())
        raise CheckpointError(f"{directory / 'config.json'}: describes a model of {built:,} parameters, and the "
                              f"weights hold {stored:,} values; transformers would allocate the difference before "
                              f"comparing them ({name} alone would be {' x '.join(map(str, largest.shape))})",
                              hint="use the config.json that came with these weights: its sizes (hidden_size, "
                                   "intermediate_size, num_hidden_layers, vocab_size, ...) must describe them")


def _first_mismatch(loader: Any, directory: Path) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """(tensor name, its shape in the weights, its shape in the model config.json describes) of the first tensor
    whose shapes differ, built on the meta device; None where it cannot be told."""
    from ..io.checkpoint import open_checkpoint

    model = _built_on_meta(loader, directory)
    if model is None:
        return None
    try:
        checkpoint = open_checkpoint(directory)
    except Exception:  # noqa: BLE001 - a probe for the message only
        return None
    try:
        stored = {n: tuple(checkpoint.info(n).shape) for n in checkpoint.names()}
    finally:
        checkpoint.close()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for name, param in model.state_dict().items():
        for key in (name, name.removeprefix(prefix), prefix + name):
            if key in stored:
                if stored[key] != tuple(param.shape):
                    return key, stored[key], tuple(param.shape)
                break
    return None


def is_encoder_decoder(directory: str | os.PathLike) -> bool:
    """Whether the model of ``directory`` is an encoder-decoder (its config says ``is_encoder_decoder``: T5, BART):
    a text alone cannot run it, it needs decoder inputs too."""
    config = _json_object(Path(directory) / "config.json")
    return config is not None and config.get("is_encoder_decoder") is True


def config_num_labels(directory: str | os.PathLike, config: dict | None = None) -> int:
    """A classifier's number of classes as transformers reads config.json: ``id2label``'s size, else ``num_labels``,
    else 2 (PretrainedConfig's default); readable before any model is built."""
    directory = Path(directory)
    if config is None:
        config = _json_object(directory / "config.json") or {}
    id2label, num = config.get("id2label"), config.get("num_labels")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    if num is None:
        return 2
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise CheckpointError(f"{directory / 'config.json'}: num_labels must be a positive integer, got {num!r}")
    return num


_NOT_SOFTMAX = {"multi_label_classification": "scores each label on its own (a sigmoid each)",
                "regression": "gives each output as a value to regress, not a class's logit"}


_SINGLE_LABEL = "give single-label classifiers (problem_type single_label_classification, or none)"


def refuse_not_softmax(problem_type: object, where: str, purpose: str, hint: str = _SINGLE_LABEL) -> None:
    """Refuse a head whose ``problem_type`` (multi-label, regression) is no softmax over exclusive classes, where
    ``purpose`` reads its logits as one; ``where`` names whose config said so."""
    if isinstance(problem_type, str) and problem_type in _NOT_SOFTMAX:
        raise ConfigError(f"{where}problem_type {problem_type}: {purpose} reads a classifier's logits as one softmax "
                          "over exclusive classes (a label is one class index), while this head "
                          f"{_NOT_SOFTMAX[problem_type]}", hint=hint)


def _config_folders(source: str | os.PathLike) -> list[Path]:
    """The folders whose config.json describes ``source``: a model folder itself; a weights file's folder (hp73b c18,
    c29), and where it is a link, its target's too (hp76b c132, hp78b c19: a link to a multi-label fine-tune's
    model.safetensors, or a Hugging Face cache snapshot's link into blobs/, whose config lies beside the link)."""
    if os.path.isdir(source):
        return [Path(source)]
    # every hop of a chain of links (hp79b c06: a link to a snapshot's link, whose config lies beside the middle
    # link), bounded as the kernel bounds a chain (40 hops)
    folders, hop = [Path(source).parent], Path(source)
    for _ in range(40):
        if not hop.is_symlink():
            break
        target = Path(os.readlink(hop))
        hop = target if target.is_absolute() else hop.parent / target
        folders.append(Path(os.path.realpath(hop.parent)))  # the folder the link sits in, as the kernel finds it
    folders.append(Path(os.path.realpath(source)).parent)
    return list(dict.fromkeys(folders))


def refuse_multi_label(source: str | os.PathLike, purpose: str, models: Sequence[Any] = (),
                       hint: str | None = None) -> None:
    """A classifier whose config.json says ``problem_type: multi_label_classification`` (a sigmoid per label, several
    true at once) or ``regression`` (outputs as values) where ``purpose`` reads its logits as one softmax over
    exclusive classes and a label as one class index: refused (hp71b c32, c41: a softmax Fisher, accuracies and
    entropies of a multi-label model, computed without a word). The base's config (``source``: its folder or weights
    file) and every model's in ``models`` (hp72b c03, c37, c52: fine-tunes trained multi-label beside a base that says
    nothing)."""
    hint = hint or _SINGLE_LABEL + (", or score them with an evaluator of your own (module:function)"
                                    if purpose == "classifier-accuracy" else "")
    sources = [("", source), *((f"model {k} ", m) for k, m in enumerate(models) if isinstance(m, (str, os.PathLike)))]
    for who, where in sources:
        if not os.path.exists(where):
            continue
        for folder in _config_folders(where):
            config = _json_object(folder / "config.json") or {}
            refuse_not_softmax(config.get("problem_type"), f"{folder / 'config.json'}: {who}", purpose, hint)


def config_vocab_size(directory: str | os.PathLike) -> int | None:
    """The rows of the input embedding config.json declares (``vocab_size``, at its top or in its ``text_config``),
    or None where it declares none. :func:`_check_sizes` has checked it is a width of the weights."""
    config = _json_object(Path(directory) / "config.json")
    for part in (config, (config or {}).get("text_config")):
        value = part.get("vocab_size") if isinstance(part, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_vocabulary(tokenizer: Any, rows: int | None, directory: str | os.PathLike, role: str = "the model") -> None:
    """Refuse a tokenizer whose token ids reach past the model's input embedding (``rows``: its rows, from the built
    model or config.json): such an id fails inside the forward as "IndexError: index out of range in self", which
    was reported after the first merge as "fix the evaluator" or blamed on a config.json that was right (hp40 V1).
    The tokenizer's size (its added tokens included) bounds every id it can give."""
    if rows is None:
        return
    try:
        size = len(tokenizer)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say its size: the forward's own check then
        return
    if size > rows:
        raise CheckpointError(f"{directory}: its tokenizer has {size:,} tokens (ids up to {size - 1:,}), past the "
                              f"{rows:,} rows of {role}'s input embedding: the tokenizer is not this model's",
                              hint="use the tokenizer files that came with these weights (tokenizer.json, vocab.txt, "
                                   "tokenizer_config.json, ...); config.json's vocab_size gives the embedding's rows")


def input_rows(model: Any) -> int | None:
    """The rows of a built model's input embedding (None where it has no single one)."""
    import torch

    try:
        weight = model.get_input_embeddings().weight
    except Exception:  # noqa: BLE001 - a model without get_input_embeddings: nothing to compare
        return None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def converted_on_load(directory: str | os.PathLike) -> str | None:
    """What transformers converts when it loads the model of ``directory`` (its config's class or model type has
    a checkpoint conversion mapping in transformers 5: an MoE's per-expert tensors fused into one, and the like),
    or None. Such a loaded model does not hold the checkpoint's tensors under their names, so statistics, a
    forward's coefficients or an evaluator's merged state named after the checkpoint cannot be matched to it
    (hostile pass 35, E12/E13)."""
    config = _json_object(Path(directory) / "config.json")
    if config is None:
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4 loads checkpoints by their names
        return None
    names = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    for key in [*names, *([model_type] if isinstance(model_type, str) else [])]:
        try:
            if get_checkpoint_conversion_mapping(key):
                return f"model type {model_type or key}" if key == model_type else key
        except Exception:  # noqa: BLE001 - transformers' internal table: no answer is no conversion
            return None
    return None


def refuse_converted(directory: str | os.PathLike, what: str) -> None:
    """A ConfigError where transformers converts ``directory``'s tensors on loading (:func:`converted_on_load`):
    ``what`` (statistics, adapt's forward, a built-in evaluator) matches tensors by their checkpoint names."""
    converted = converted_on_load(directory)
    if converted is None:
        return
    import transformers

    raise ConfigError(f"{directory}: transformers {transformers.__version__} converts this model's tensors when it "
                      f"loads them ({converted}: e.g. per-expert tensors fused into one), so the loaded model does "
                      f"not hold the checkpoint's tensors under their names, which {what} needs",
                      hint="merge it with a method that needs no data (ties, task_arithmetic, ...); to tune or adapt, "
                           "write your own evaluator (module:function) that saves and loads the merged model")


def align_pad_token(model: Any, tokenizer: Any, directory: str | os.PathLike) -> None:
    """A sequence classifier reads its answer at the last token that is not padding, so its config needs the pad
    token's id: a Llama-family classifier saved with pad_token_id null failed every batch of 2 or more ("Cannot
    handle batch sizes > 1 if no padding token is defined", blamed on its config, hp35 E51). The tokenizer's pad
    token is the one its batches are padded with: the config takes it; with none on either side, a typed error."""
    config = getattr(model, "config", None)
    if not type(model).__name__.endswith("ForSequenceClassification") or config is None:
        return
    named = getattr(config, "pad_token_id", None)
    if named is not None:
        if getattr(tokenizer, "pad_token_id", None) is None:  # config.json names it, the tokenizer has none: its
            # batches pad with the config's token (hp64b c27: following the hint, "Asking to pad but the tokenizer
            # does not have a padding token", blamed on the config)
            token = tokenizer.convert_ids_to_tokens(named) if isinstance(named, int) and not isinstance(named, bool) \
                and 0 <= named < len(tokenizer) else None
            if token is None:
                raise ConfigError(f"{directory}: config.json's pad_token_id {named!r} is no token of the tokenizer "
                                  f"({len(tokenizer)} tokens)", hint="set pad_token_id to a token's id (e.g. the eos "
                                                                     "token's)")
            tokenizer.pad_token = token
        return
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        config.pad_token_id = pad
        return
    raise ConfigError(f"{directory}: neither config.json nor the tokenizer names a pad token, and this classifier "
                      "reads its answer at the last token that is not padding, so texts of different lengths cannot "
                      "be scored together", hint="set pad_token_id in config.json (e.g. to the eos token's id), or "
                                                 "give the tokenizer a pad token")


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' loading chatter off (its load report of missing and unexpected keys, with terminal
    escapes, "this checkpoint seem corrupted", "consider training on your downstream task"): what matters
    of it tiesmerge checks itself and says once, as an error naming the tensors."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def architectures(directory: str | os.PathLike) -> list[str]:
    """The ``architectures`` a model folder's config.json names (none: transformers decides)."""
    config = read_json(Path(directory) / "config.json", "the model's config")
    names = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in names] if isinstance(names, list) else []


# what each built-in evaluator's model must be, by the architecture names transformers gives them
_KINDS = {"seq-cls": (("ForSequenceClassification",), "a sequence classifier (*ForSequenceClassification)"),
          "lm": (("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"),
                 "a language model (*ForCausalLM, *LMHeadModel or *ForConditionalGeneration)")}
_FITS = {"seq-cls": "classifier-accuracy", "lm": "lm-perplexity or choice-accuracy"}


def check_kind(directory: str | os.PathLike, kind: str, evaluator: str) -> None:
    """Refuse, before transformers builds it, a base whose config names only architectures of another kind
    than evaluator ``evaluator`` scores (``kind``: "seq-cls" or "lm"), saying which built-in fits it."""
    archs = architectures(directory)
    suffixes, needed = _KINDS[kind]
    if not archs or any(a.endswith(suffixes) for a in archs):
        return
    other = next((k for k, (sfx, _) in _KINDS.items() if k != kind and any(a.endswith(sfx) for a in archs)), None)
    raise ConfigError(f"{directory}: {evaluator} needs {needed}, and the base is a {', '.join(archs)}",
                      hint=(f"{_FITS[other]} fits this base" if other else "encoder-accuracy (sentence embeddings "
                            "and class descriptions) fits most encoders") + "; or write an evaluator of your own")


def from_pretrained(loader: Any, directory: str | os.PathLike, role: str = "the model", **kwargs: Any) -> Any:
    """``loader.from_pretrained(directory, trust_remote_code=False, **kwargs)`` (an Auto class, or a function
    taking a directory and keywords); transformers' own errors for unusable files become a CheckpointError naming
    them."""
    stored = _check_config(Path(directory))
    model_loader = hasattr(loader, "from_config") or not isinstance(loader, type)  # not a tokenizer
    if stored is not None and model_loader:
        _check_built(loader, Path(directory), stored)
    load = getattr(loader, "from_pretrained", loader)
    # never a model's own code: a config or tokenizer_config whose auto_map names a .py file beside the weights
    # would make transformers ask "run the custom code? [y/N]" on the terminal (and run it on "y"); False refuses
    kwargs["trust_remote_code"] = False
    try:
        with _transformers_quiet():
            if not model_loader:
                return load(directory, **kwargs)
            model, info = load(directory, output_loading_info=True, **kwargs)
    except (TiesMergeError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a config's values reach transformers' code: ZeroDivisionError,
        # AssertionError, huggingface_hub's validation errors... all say the folder cannot be loaded
        what = loader.__name__ if isinstance(loader, type) else "transformers"  # not a helper of ours (hp34 D35)
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise CheckpointError(f"{directory}: {role} needs code shipped in the model folder (an auto_map in its "
                                  f"config.json or tokenizer_config.json); tiesmerge never runs a model's own code",
                                  hint="use a model whose architecture and tokenizer transformers ships, or remove "
                                       "the auto_map entries if the standard classes fit") from None
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        hint = "check its config.json and tokenizer files (a tokenizer_config.json naming a file that is not there, " \
               "a config of another architecture)"
        if "ignore_mismatched_sizes" in str(exc):  # its text points at a load report tiesmerge keeps quiet
            apart = _first_mismatch(loader, Path(directory))  # named here (hp72b c26: neither tensor nor field)
            head = apart is not None and apart[0].rsplit(".", 2)[-2] in ("classifier", "score", "out_proj")
            raise CheckpointError(f"{directory}: the weights' shapes are not those of the model its config.json "
                                  f"describes, so {what} cannot load {role}"
                                  + (f" ({apart[0]} is {list(apart[1])} in the weights, {list(apart[2])} in that "
                                     "model)" if apart is not None else ""),
                                  hint="use the config.json that came with these weights ("
                                       + (f"num_labels, and id2label / label2id if given, must be the classifier's "
                                          f"{apart[1][0]} rows)" if head and apart is not None else
                                          "its sizes: hidden_size, intermediate_size, head_dim, num_attention_heads, "
                                          "... must describe them)")) from None
        try:
            str(directory).encode("utf-8")
        except UnicodeEncodeError:  # safetensors' and tokenizers' readers take UTF-8 paths only (hostile pass 25, N7)
            hint = "its path holds a byte that is no UTF-8, which transformers' file readers refuse: rename the " \
                   "folder (or point a link with a UTF-8 name at it)"
        raise CheckpointError(f"{directory}: {what} cannot load {role} ({type(exc).__name__}: {first})",
                              hint=hint) from None
    # transformers' own list of what it initialised at random (names after any conversion): a config.json that
    # adds modules the weights lack (is_decoder + add_cross_attention, attention_bias) runs a model that is not
    # the checkpoint's, in stats, adapt and the evaluators alike (hp34 D62, hp35 E24). A pooler a checkpoint was
    # saved without is left as it was: the forwards that load one never read it.
    fresh = [n for n in (info or {}).get("missing_keys", []) if ".pooler." not in f".{n}"]
    if fresh:
        raise CheckpointError(f"{directory}: config.json describes {len(fresh)} parameter(s) the weights do not hold, "
                              f"e.g. {', '.join(sorted(fresh)[:3])}; transformers would initialise them at random, so "
                              f"{role} would not be this checkpoint's model",
                              hint="use the config.json that came with these weights (options such as is_decoder, "
                                   "add_cross_attention or attention_bias add modules)")
    return model


# encoders whose position ids start past the padding index (RoBERTa's create_position_ids_from_input_ids):
# a sequence of max_position_embeddings - 2 tokens already uses the last position. Not BART/mBART: their table holds
# max_position_embeddings + 2 rows (the offset is inside it), so all max_position_embeddings are usable (hp40 L7:
# subtracting it here cut a 16-position BART to 14)
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "xlm-roberta-xl": 2, "camembert": 2, "longformer": 2,
                    "mpnet": 2, "ibert": 2, "luke": 2, "esm": 2, "data2vec-text": 2, "xmod": 2,
                    "roberta-prelayernorm": 2, "markuplm": 2}


def fitted_length(model: Any, max_length: int) -> int:
    """``max_length`` capped at what the model's position table holds (``config.max_position_embeddings``, less the
    offset some encoders start their positions at): a text truncated only at ``max_length`` could index past the
    table and fail inside the model's forward (a 32-position model with the default 128 did)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return max_length
    usable = positions - _POSITION_OFFSET.get(str(getattr(config, "model_type", "")), 0)
    return max(1, min(max_length, usable))


def fitted_length_of(directory: str | os.PathLike, max_length: int) -> int:
    """:func:`fitted_length` from the model folder's config.json, before the model is built (an evaluator's checks
    when it is made)."""
    from types import SimpleNamespace

    config = _json_object(Path(directory) / "config.json") or {}
    # transformers maps other names onto max_position_embeddings (GPT-2's n_positions, GPT-J's n_ctx): read as the
    # built config reads them (hp64b c34, c35: a GPT-2's 32 positions went unseen, its texts cut without a word)
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in config), None)
    return fitted_length(SimpleNamespace(config=SimpleNamespace(
        max_position_embeddings=positions, model_type=config.get("model_type"))), max_length)


def refuse_alike(tokenizer: Any, texts: Sequence[str], *, where: str, what: str,
                 directory: str | os.PathLike | None, max_length: int, special_tokens: bool, truncate: bool) -> None:
    """Two answer choices or class descriptions that differ as text but are the same tokens to the model (two unknown
    words, "GOOD" and "good" under a lower-casing tokenizer, or texts that differ only past the ``max_length`` tokens
    an encoder reads: ``truncate``) score the same whatever the merge: ties go to the first, so its examples are
    always right, and adapt's entropy over them never moves (hp41 C47, C48; hp42 D2, D3, D27). The ids are those
    the forward makes: ``special_tokens`` as it adds them."""
    seen: dict[tuple[int, ...], str] = {}
    for text in texts:
        with forward_checked(directory, "the base"):
            ids = tuple(tokenizer(clipped(text, max_length), add_special_tokens=special_tokens, truncation=truncate,
                                  **({"max_length": max_length} if truncate else {}))["input_ids"])
            own = tokenizer(clipped(text, max_length), add_special_tokens=False)["input_ids"] if special_tokens \
                else ids
        plural = {"class": "class descriptions"}.get(what, f"{what}s")
        if not own:  # zero-width or control characters the tokenizer drops: a class read as [CLS] [SEP] alone
            # (hp69b c33: "\u200b" passed the empty-text check)
            raise ConfigError(f"{where}: the {what} {text[:40]!r} has no tokens to the base's tokenizer (it drops "
                              "every character of it: spaces, zero-width or control characters), so it holds nothing "
                              "to score",
                              hint=f"give each {what} words the tokenizer reads")
        if ids in seen and seen[ids].strip() == text.strip():  # the same, or the same but for spaces (hp46 c41)
            how = "is listed twice" if seen[ids] == text else \
                f"and {seen[ids][:40]!r} differ only in spaces"
            raise ConfigError(f"{where}: the {what} {text[:40]!r} {how}, so the model could never tell "
                              f"those {plural} apart", hint=f"give each {what} its own text")
        if ids in seen:
            with forward_checked(directory, "the base"):
                whole = [tokenizer(clipped(t, 1 << 16), add_special_tokens=special_tokens)["input_ids"]
                         for t in (seen[ids], text)]
            cut = truncate and whole[0] != whole[1]  # the same only in what the model reads
            raise ConfigError(
                f"{where}: the {plural} {seen[ids][:40]!r} and {text[:40]!r} are the same "
                + (f"in their first {max_length} tokens, all the model reads" if cut else "tokens to the base's "
                   "tokenizer") + ", so the model could never tell them apart",
                hint=(f"make them differ within their first {max_length} tokens (the model's positions, or "
                      "--max-length, bound what it reads)" if cut else
                      f"give each {what} words its tokenizer knows apart (unknown words all read as one token; a "
                      "lower-casing tokenizer folds case)"))
        seen.setdefault(ids, text)


@contextmanager
def forward_checked(directory: str | os.PathLike | None, role: str = "the model") -> Iterator[None]:
    """Errors of a model's own forward pass as a typed error naming it: a config.json whose values transformers
    accepts when loading but cannot run (a negative layer count, zero heads, a pad id past the vocabulary, an
    epsilon given as text) fails inside the model, which is no bug of tiesmerge's."""
    try:
        yield
    except (TiesMergeError, KeyboardInterrupt, MemoryError, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever the model's code raises; a tokenizer's Rust panic too
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
        where = f"{directory}: " if directory is not None else ""
        if type(exc).__name__ == "PanicException" or "tokeniz" in type(exc).__module__.lower():
            raise CheckpointError(f"{where}{role}'s tokenizer fails on the text ({type(exc).__name__}: {first})",
                                  hint="its tokenizer files hold something the tokenizers library cannot run (e.g. a "
                                       "pre-tokenizer regex that backtracks): use the model's original tokenizer") \
                from None
        if "vmap" in str(exc) or "functorch" in type(exc).__module__:  # torch.func cannot trace this model's code
            raise CheckpointError(f"{where}{role}'s forward pass cannot run under torch.func.vmap "
                                  f"({type(exc).__name__}: {first})",
                                  hint="compute per-example gradients one example at a time: --per-example loop "
                                       "(the default)") from None
        if "allocate" in first or "out of memory" in first.lower():  # torch's allocator, on the CPU or a GPU
            raise CheckpointError(f"{where}{role}'s forward pass ran out of memory ({type(exc).__name__}: {first})",
                                  hint="fewer examples at a time (--batch-size) or shorter texts (--max-length); on a "
                                       "GPU, one with more memory or --device cpu") from None
        if isinstance(exc, IndexError) and "index out of range" in first:  # an embedding's lookup: a token id past
            # its rows is as often the tokenizer's as the config's (hp40 V1: a right config was blamed)
            raise CheckpointError(f"{where}{role} fails in its forward pass ({type(exc).__name__}: {first})",
                                  hint="an id past an embedding's rows: a tokenizer that is not this model's (more "
                                       "tokens than config.json's vocab_size), or a config.json whose pad, position "
                                       "or type ids do not fit these weights: use the model's original tokenizer and "
                                       "config") from None
        raise CheckpointError(f"{where}{role} fails in its forward pass ({type(exc).__name__}: {first})",
                              hint="its config.json likely does not describe these weights (a layer or head count, a "
                                   "token id or an epsilon out of range): use the model's original config") from None


CHARS_PER_TOKEN_BOUND = 100  # no tokenizer we know makes tokens this long on real text; BPE tokens average ~4 chars


def clipped(text: str, max_length: int) -> str:
    """``text`` cut to what ``max_length`` tokens can cover, before tokenizing: a fast tokenizer tokenizes the whole
    text and truncates afterwards, so one 60 MB line of data took 1.3 GB per 6 MB and minutes for the 128 tokens
    that were kept (the sixth pass's jc_d). The cut lies far past those tokens (100 characters each)."""
    limit = max_length * CHARS_PER_TOKEN_BOUND
    return text if len(text) <= limit else text[:limit]


def clipped_tail(text: str, max_length: int) -> str:
    """``text`` cut to the end that ``max_length`` tokens can cover: a prompt before an answer keeps its last tokens
    (rank classification), and was tokenized whole first (one 6 MB line: 40 s and 2.1 GB, hp37b AD3)."""
    limit = max_length * CHARS_PER_TOKEN_BOUND
    return text if len(text) <= limit else text[-limit:]


def count_cut(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None, *, max_length: int) -> int:
    """How many of ``texts`` (with their ``pairs``) :func:`encode` cuts at ``max_length`` tokens: what a run that
    truncates says, rather than cutting without a word (hp39 C23). Tokenizes each text once more, unpadded, to one
    token past the cut (no longer: a tokenizer warns of sequences past the model's length). A length that leaves no
    token of the text beside the tokenizer's special ones is refused: every example read as [CLS] [SEP] (at 2), or,
    below that, not cut at all, though said as cut (hp74b c09, c10, c31)."""
    try:
        special = int(tokenizer.num_special_tokens_to_add(pair=pairs is not None))
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: its own truncation then
        special = 0
    if texts and max_length <= special:
        raise ConfigError(f"a length of {max_length} tokens leaves no token of the text beside the tokenizer's "
                          f"{special} special tokens{' (a text pair)' if pairs is not None else ''}: every example "
                          "would be read as those alone",
                          hint=f"give --max-length (max_length) of at least {special + 1}, or a model of more "
                               "positions")
    cut = 0
    for k in range(0, len(texts), 256):  # batches: a fast tokenizer's per-call cost, bounded memory
        chunk = [clipped(t, max_length + 1) for t in texts[k:k + 256]]
        pair = [clipped(t, max_length + 1) for t in pairs[k:k + 256]] if pairs is not None else None
        with forward_checked(None):
            ids = tokenizer(chunk, pair, truncation=True, max_length=max_length + 1, padding=False)["input_ids"]
        cut += sum(len(i) > max_length for i in ids)
    return cut


def warn_unknown(tokenizer: Any, texts: Sequence[str | Sequence[str]], *, max_length: int, where: str, effect: str,
                 stacklevel: int = 3, what: str = "examples", whose: str = "the base's tokenizer") -> None:
    """Said when most tokens of ``texts`` (the first 256 examples) are the tokenizer's unknown token: a model then
    reads every example as the same few tokens, and what is computed from them (``effect``) describes that token, not
    the texts (hp63b c25: statistics, AdaMerging and accuracies on texts a 5-token vocabulary read as [UNK], without a
    word; lm-perplexity alone said so). An example of several texts (a prompt and its choices) is a tuple of them
    (hp68b c33, c43: prompts and choices listed apart were counted as examples, and 256 prompts hid every choice).
    ``what`` the items are called (a task's class descriptions: "tasks"); ``whose`` the tokenizer (statistics read
    the model's own, hp71b c03: "the base's tokenizer" of a command that has no base)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None or not texts:  # byte-level tokenizers (GPT-2's) know every text
        return
    examples = list(texts[:256])
    sample = [clipped(t, max_length) for e in examples for t in (e if isinstance(e, (list, tuple)) else [e])
              if isinstance(t, str)]
    with forward_checked(None):
        ids = tokenizer(sample, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    import warnings

    from ..errors import MergeWarning

    # a plain text of no tokens (zero-width or control characters the tokenizer drops): the model reads the special
    # tokens alone, one example of nothing counted like the others (hp70b c47)
    empty = [k for k, (t, i) in enumerate(zip(sample, ids)) if not i and t.strip()]
    if empty and all(isinstance(e, str) for e in examples):
        warnings.warn(MergeWarning(
            f"{where}: {len(empty):,} of its first {len(examples):,} {what} are no tokens to {whose} (it "
            f"drops every character: zero-width or control characters), first {sample[empty[0]][:40]!r}, so each "
            f"is read as nothing, and counted all the same"), stacklevel=stacklevel)
    total = sum(len(i) for i in ids)
    share = sum(1 for i in ids for x in i if x == unknown) / max(1, total)
    if share >= 0.5:
        warnings.warn(MergeWarning(
            # ("1 tokens of its first 1 examples": hp88b c67)
            f"{where}: {share:.0%} of the {total:,} token{'' if total == 1 else 's'} of "
            + (f"its first {len(examples):,} {what}" if len(examples) > 1 else f"its one {what.rstrip('s')}")
            + (" is" if total == 1 else " are") + " unknown to "
            f"{whose} ({tokenizer.unk_token!s}), so {effect}: the texts are not of the language or "
            "vocabulary the model was trained on (or the tokenizer lacks its vocabulary)"), stacklevel=stacklevel)


def encode(tokenizer: Any, texts: list[str], pairs: list[str] | None = None, *, max_length: int,
           padding: bool = True, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """``texts`` (and ``pairs``) as the model's input tensors: each cut first (:func:`clipped`), truncated at
    ``max_length`` tokens, padded; a tokenizer's own failure (a Rust panic) is a typed error naming ``directory``.
    The one place statistics, the encoders and adapt's forward tokenize."""
    texts = [clipped(t, max_length) for t in texts]
    pairs = [clipped(t, max_length) for t in pairs] if pairs is not None else None
    with forward_checked(directory):
        batch = dict(tokenizer(texts, pairs, padding=padding, truncation=True, max_length=max_length,
                               return_tensors="pt"))
    ids = batch.get("input_ids")
    if ids is not None and ids.dim() == 2 and ids.shape[1] == 0:  # hp36 C20: "cannot reshape a tensor of 0
        # elements" in the forward, blamed on config.json
        where = f"{directory}: " if directory is not None else ""
        raise CheckpointError(f"{where}its tokenizer ({type(tokenizer).__name__}) turns the texts into no tokens at "
                              f"all (e.g. {texts[0][:40]!r})",
                              hint="check the tokenizer files: tokenizer_config.json's tokenizer_class must be the "
                                   "tokenizer that tokenizer.json or the vocabulary files describe")
    return batch
