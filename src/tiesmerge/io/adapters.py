"""PEFT adapter directories read as task vectors: LoRA (ΔW = s · B · A) and (IA)³ (τ = l − 1).

An adapter is a checkpoint like any other, except that what it yields is already the task
vector: ``read(name, rows)`` returns τ's rows in float32, computed on the fly from the adapter's
factors (one module, one row chunk at a time; never the whole model). The engine takes these
rows as τ instead of subtracting the base (``yields_task_vector``).

Tensor names follow the base model's: an adapter is *bound* to the base (``bind``), which maps
PEFT's keys (``base_model.model.<module>.lora_A.weight``) to the base's tensor names and checks
every shape. A base tensor the adapter does not target has τ = 0.

- LoRA: per target module ΔW = s · B · A with s = α / r (rsLoRA: α / √r; ``alpha_pattern`` per
  module), r the module's own rank, so adapters of different ranks merge together. Embedding
  LoRA and ``fan_in_fan_out`` layers store the transpose: ΔW = s · (B · A)ᵀ. Full tensors saved
  beside the factors (``modules_to_save``, trained biases) give τ = saved − base.
- (IA)³: τ = l − 1 of the learned scaling vectors; see :mod:`tiesmerge.io.ia3`.

Opening and binding read only headers and configs, never torch; ``read`` computes with torch.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import FLOAT32
from ..errors import CheckpointError, IncompatibleCheckpointsError, InvalidTensorError, MergeWarning
from ..limits import read_json
from ..paths import inside
from .ia3 import Ia3Checkpoint, Ia3Identity, ia3_identity
from .load_dtypes import LoadDtypes, fold_overflow
from .patterns import PatternTable
from .peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    BaseNames,
    adapter_kind,
    bind_once,
    one_key_per_module,
    read_adapter_dir,
    strip_key,
    yields_task_vector,
)
from .peft_targets import base_model_types, check_adapted, conv1d_layout, warn_layout_unknown
from .protocol import Checkpoint, TensorInfo, rows_shape

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "open_adapter", "LoraCheckpoint", "Ia3Checkpoint",
           "Ia3Identity", "LoraTarget", "ia3_identity", "ZeroBase", "yields_task_vector", "adapter_kind"]

_UNSUPPORTED_LORA = {  # config keys whose non-default value changes what ΔW is
    "use_dora": "DoRA adds a learned magnitude vector, so ΔW is not s·B·A",
    "target_parameters": "LoRA on raw parameters (target_parameters) has no module weight to add to",
    "layer_replication": "layer replication changes the base model's layout",
    "use_qalora": "QA-LoRA pools the inputs, so ΔW is not s·B·A",
    "lora_bias": "lora_bias trains a bias beside B, a change of the module's bias that is not s·B·A",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) replace embedding rows, not s·B·A",
    # PEFT 0.21's LoRA variants (LoraConfig fields marked is_lora_variant), each decided: VeLoRA (a backward pass
    # only) and MonteCLoRA (merged as its plain factors) are s·B·A; these are not
    "alora_invocation_tokens": "activated LoRA applies B·A only from its invocation tokens on, so it cannot be folded "
                               "into the weights (PEFT cannot merge it either)",
    "arrow_config": "Arrow routes each token among several LoRA experts, so there is no one s·B·A",
    "use_bdlora": "BD-LoRA stores its factors as diagonal blocks, so ΔW is not s·B·A of the tensors saved",
    "kasa_config": "KaSA truncates the base weight's smallest singular components, so the adapter is relative to "
                   "another base than the one it names",
}


def _number(value: object, what: str, source: str) -> float:
    """A config number (LoRA's alpha): an int or float, finite; a string or bool is refused, not guessed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {what} is {str(value)[:80]!r} ({type(value).__name__}), not a finite number",
                              hint="fix the adapter config (PEFT writes lora_alpha as a number)")
    return float(value)


# LoRA initialisations that move the base itself (the adapter is then relative to a residual base, not to the base
# it names): PiSSA (and its pissa_niter_N), OLoRA, CorDA, LoftQ and LoRA-GA (W - s·B0·A0). A converted adapter says
# init_lora_weights true; "gaussian", "orthogonal", "eva" and "mica" leave the base as it is.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# a LoRA scale alpha / r is a few units (alpha 8..64, r 4..64); this bound only refuses nonsense
# such as lora_alpha 1e300, whose products overflow, not any adapter someone trained
MAX_LORA_SCALE = 1e6


# PEFT's LoraConfig default r: what PEFT builds every module with when the config does not say
PEFT_DEFAULT_RANK = 8


def _declared_rank(config: dict, source: str) -> int:
    """The config's ``r``: a positive integer; PEFT's default 8 where the config has none (PEFT builds the modules
    with it, and refuses factors of another rank: hostile pass 31, C44). A module's own rank may come from
    ``rank_pattern`` instead: see ``LoraCheckpoint.bind``."""
    if "r" not in config:
        return PEFT_DEFAULT_RANK
    r = config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{source}: r is {repr(r)[:80]}, not a positive integer (the LoRA rank)",
                              hint="fix the adapter config (PEFT writes r as a positive integer)")
    return r


def _patterns(config: dict, key: str, source: str) -> PatternTable:
    """PEFT's per-module pattern table (``alpha_pattern``, ``rank_pattern``): module names indexed, regex keys on a
    matcher that never backtracks, each value checked as a number."""
    table = config.get(key)
    table = {} if table is None else table  # [], '', 0, False: no mapping PEFT reads either (hostile pass 32, C145)
    if not isinstance(table, dict):
        raise CheckpointError(f"{source}: {key} is a {type(table).__name__}, not a mapping of module patterns",
                              hint=f'PEFT writes {key} as {{"module name or regex": value, ...}}: fix the adapter '
                                   "config, or save the adapter again with PEFT")  # (hp87a c113: --help's hint)
    if key == "rank_pattern":  # a rank builds a layer: a whole number, as r itself (4.0 is refused there too)
        return PatternTable(table, key, source, lambda value, what: _rank(value, what, source))
    return PatternTable(table, key, source, lambda value, what: _number(value, what, source))


def _rank(value: object, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {what} is {str(value)[:80]!r} ({type(value).__name__}), not a positive "
                              "integer (a LoRA rank)", hint="fix the adapter config (PEFT writes ranks as integers)")
    return float(value)


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted module, bound to a base tensor."""

    module: str  # the module's path in the PEFT model, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    transposed: bool  # embedding or fan_in_fan_out: ΔW = s (B A)^T
    embedding: bool


# a factor key with the adapter's name in it (`...q_proj.lora_A.default.weight`): a PeftModel's state_dict()
_ADAPTER_NAMED = re.compile(r"\.lora_(?:A|B)\.([^.]+)\.weight$|\.lora_embedding_(?:A|B)\.([^.]+)$")


def _keys_of(names: list[str], where: Path, same: Callable[[str, str], bool]
             ) -> tuple[dict[str, tuple[str, str, bool]], dict[str, str]]:
    """A LoRA file's keys sorted out: module -> (A key, B key, embedding), and the tensors stored whole (modules_to_save
    copies, trained biases, an adapted embedding's base_layer) by their module-less name. A factor without its partner,
    or a module stored twice with different values, is refused; ``same(key, key)`` compares two keys' bytes.

    PEFT's own save_pretrained of a SEQ_CLS adapter with bias "all" writes the classifier's trained bias twice (as
    ``classifier.bias`` and ``classifier.modules_to_save.bias``, equal) and the frozen original's bias as
    ``classifier.original_module.bias``, which PEFT's merge_and_unload discards with the original module: the equal
    copy is one tensor, the original module's is no change (hostile pass 31, C77)."""
    keys = set(names)  # a set: each A factor's B is looked up (a list made that quadratic: hp28 F2)
    factors: dict[str, tuple[str, str, bool]] = {}
    firsts: dict[str, str] = {}  # module -> its A factor's key
    full: dict[str, str] = {}
    for key in names:
        # PEFT also loads factors that carry its default adapter name (a PeftModel's state_dict() saved as is): the
        # same factors (hostile pass 32, C102); another name is dropped when PEFT loads the file (refused below)
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                              (".lora_A.default.weight", ".lora_B.default.weight", False),
                                              (".lora_embedding_A", ".lora_embedding_B", True),
                                              (".lora_embedding_A.default", ".lora_embedding_B.default", True)):
            if key.endswith(a_suffix):
                module = strip_key(key, a_suffix)
                b_key = key[: -len(a_suffix)] + b_suffix
                if b_key not in keys:
                    raise CheckpointError(f"{where}: {key!r} has no matching {b_key!r}",
                                          hint="a LoRA module needs both factors, A and B: the adapter file is "
                                               "incomplete or damaged; save or download it again")
                one_key_per_module(firsts, module, key, where)
                factors[module] = (key, b_key, embedding)
        if ".lora_" not in key and ".original_module." not in key:
            # modules_to_save and trained biases are stored whole
            # (PEFT also saves an adapted embedding's own weight, as <module>.base_layer.weight)
            plain = key.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
            plain = plain.replace(".base_layer.", ".")
            other = full.get(plain)
            if other is not None and other != key and same(other, key):
                continue  # the same bytes under both of PEFT's names for a saved copy: one tensor
            one_key_per_module(full, plain, key, where)
    return factors, full


def _refuse_unloaded_whole(key: str, adapted: dict[str, tuple[str, str, bool]], label: str) -> None:
    """Refuse a tensor saved whole that PEFT's loader would drop (it loads the file with strict=False, so an
    unexpected key goes unused without a word, and merging it merged a change nobody runs): a ``base_layer`` tensor
    of a module the adapter does not adapt (only an adapted module has a base_layer), and a plain tensor of an
    adapted module (its own tensors live under base_layer now). Hostile pass 31, C39 and C42; pass 30, F4 for the
    weight. A plain tensor of a module the adapter leaves alone is loaded into the model: it is merged whole."""
    if ".modules_to_save." in key:
        return
    if ".base_layer." in key:
        owner = strip_key(key.split(".base_layer.")[0], "")
        if owner not in adapted:
            raise IncompatibleCheckpointsError(
                f"{label}: {key!r} is a base_layer tensor of {owner!r}, which the adapter does not adapt (it holds "
                "no LoRA factors for it); PEFT puts a base_layer only under an adapted module and would drop this "
                "tensor when it loads the adapter", hint="the adapter file holds a stray tensor: remove it, or save "
                                                         "the adapter again with PEFT")
        return
    owner, _, tensor = strip_key(key, "").rpartition(".")
    if owner in adapted:
        raise IncompatibleCheckpointsError(
            f"{label}: {key!r} is a whole {tensor} of {owner!r}, which the adapter's LoRA factors adapt; PEFT keeps an "
            f"adapted module's own tensors as <module>.base_layer.{tensor} and would not load this one",
            hint="the adapter file holds a stray tensor: remove it, or save the adapter again with PEFT")


# transformers' class names of the models with an output head over the vocabulary (tied to the input embedding
# where the config says so); a base that ties its head stores none, so its architecture is what tells
_LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration", "ForPreTraining",
                    "WithLMHead")


def _heads_following_the_embedding(full: dict[str, str], file: Checkpoint, base: Checkpoint, label: str) -> set[str]:
    """The saved copies (modules_to_save) of the embedding and of the output head of a base that ties the two.

    With PEFT's ensure_weight_tying the adapter saves both copies, equal, and PEFT keeps them tied: the head's copy
    is returned, to be skipped (the head follows the embedding in the tied output). Without it (PEFT's default)
    only the embedding's copy is saved, and PEFT runs the new embedding with the base's old head: a merged model
    that ties one matrix cannot hold that, so it is refused (hostile pass 31, C68/C69)."""
    from .align import _EMBED_SUFFIXES, _HEAD_SUFFIXES, _same_bytes, read_model_config, ties_word_embeddings

    embeds = {p: k for p, k in full.items() if p.endswith(_EMBED_SUFFIXES) and ".base_layer." not in k}
    if not embeds:
        return set()
    shared = next((p for p in embeds if strip_key(p, "") == "shared.weight" or p.endswith(".shared.weight")), None)
    if shared is not None:  # hostile pass 31, C103
        raise IncompatibleCheckpointsError(
            f"{label}: the adapter saves a new {strip_key(shared, '')!r} (modules_to_save), the embedding an "
            "encoder-decoder model (T5, BART, ...) shares with its encoder's and decoder's embed_tokens: PEFT replaces "
            "only the 'shared' attribute, so the model it runs keeps the old embedding in both stacks (and in its "
            "head where tied), while a merged model ties them all to the new one",
            hint="merge the adapter into its base with PEFT (merge_and_unload) and merge the full model, or train "
                 "the adapter without the shared embedding in modules_to_save")
    config = read_model_config(base)
    if not ties_word_embeddings(config):
        return set()
    heads = {p: k for p, k in full.items() if p.endswith(_HEAD_SUFFIXES) and ".base_layer." not in k}
    stored_heads = [n for n in base.names() if n.endswith(_HEAD_SUFFIXES)]
    follows: set[str] = set()
    for plain, key in embeds.items():
        twins = [h for h, k in heads.items() if _same_bytes(file, key, file, k)]
        if twins:
            if not stored_heads:  # the base's tied head is its embedding: the copy is merged once, as that
                follows.update(twins)
            continue
        architectures = config.get("architectures")
        has_head = bool(stored_heads) or (isinstance(architectures, list) and any(
            isinstance(a, str) and a.endswith(_LM_HEAD_CLASSES) for a in architectures))
        if has_head and heads:  # a new head beside, of other values (hp56 c90: "with the base's old head")
            raise IncompatibleCheckpointsError(
                f"{label}: the adapter saves new copies of {strip_key(plain, '')!r} and of the output head "
                f"{strip_key(next(iter(heads)), '')!r} (modules_to_save) that differ, for a base that ties the two "
                "(tie_word_embeddings): PEFT runs them apart, which a merged model holding one tied matrix cannot be",
                hint="merge it into its base with PEFT (merge_and_unload), save that untied, and merge the full model; "
                     "or, if the base is not tied, set tie_word_embeddings: false in its config.json")
        if has_head:
            raise IncompatibleCheckpointsError(
                f"{label}: the adapter saves a new {strip_key(plain, '')!r} (modules_to_save) for a base that ties its "
                "output head to that embedding (tie_word_embeddings); PEFT runs the new embedding with the base's old "
                "head (the adapter was trained without ensure_weight_tying), which a merged model holding one tied "
                "matrix cannot be: its head would become the new embedding",
                hint="train the adapter with ensure_weight_tying=True (PEFT then saves the head's copy beside it), or "
                     "merge it into its base with PEFT (merge_and_unload), save that untied, and merge the full model")
    return follows


# a folded LoRA's whole product B·A kept for its tensor's chunks up to this size; past it, each chunk's own rows
_WHOLE_PRODUCT_BYTES = 256 << 20
_HELD_BYTES: dict[int, int] = {}  # adapter (its token) -> the bytes of the whole product it keeps
_TOKENS = itertools.count()  # each adapter's own key (an id() is reused once an object is freed: hp51 c03)


# what merges an adapter trained on a resized vocabulary: its own rows exist only in a model folded from it
_RESIZED_HINT = ("merge the adapter into its base with PEFT (merge_and_unload, after resizing the base's embeddings as "
                 "the adapter's training did) and merge the full model, with --vocab-policy union if the vocabularies "
                 "differ")


_MIN_PRODUCT_ROWS = 64  # a product's rows formed at least this many at a time (16 sufficed on the machines tried)


def _widened(rows: slice, total: int) -> slice:
    """``rows`` (a step-1 slice within ``total``) widened to at least _MIN_PRODUCT_ROWS rows, within the tensor."""
    start, stop, _ = rows.indices(total)
    if stop - start >= _MIN_PRODUCT_ROWS or total <= stop - start:
        return slice(start, stop)
    stop = min(total, max(stop, start + _MIN_PRODUCT_ROWS))
    return slice(max(0, min(start, stop - _MIN_PRODUCT_ROWS)), stop)


def _cut(delta: Any, rows: slice | None, window: slice | None, total: int) -> Any:
    """``rows`` of ``delta``, a product formed over ``window`` (from _widened)."""
    if rows is None or window is None:
        return delta
    start, stop, _ = rows.indices(total)
    return delta[start - window.start:stop - window.start]


def _may_hold(size: int) -> bool:
    """Whether one more whole product of ``size`` bytes fits the bound all adapters share (past it, a chunk's own
    rows are formed: equal to the whole one's in the engine's large chunks)."""
    return sum(_HELD_BYTES.values()) + size <= _WHOLE_PRODUCT_BYTES


def _release_product(owner: Any) -> None:
    owner._fold_product = None
    _HELD_BYTES.pop(owner._token, None)


class LoraCheckpoint:
    """A PEFT LoRA adapter directory, read as the task vectors ΔW = s · B · A of its modules."""

    yields_task_vector = True
    adapter_kind = "lora"

    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        self.path = path
        # mergekit's MODEL+LORA: PEFT folds the update into the base as transformers loads it (its own dtype), and
        # the merge reads the folded weights; set by a translated mergekit recipe (see fold_like_peft)
        self.fold_like_peft = False
        self._token = next(_TOKENS)
        self._fold_product: tuple[str, Any] | None = None  # (tensor, B·A) kept for the tensor's next chunks
        self._load_dtypes: LoadDtypes | None = None  # each weight's dtype as transformers loads the base, once bound
        self.config, self._file = read_adapter_dir(path, label)
        if str(self.config.get("peft_type", "")).upper() != "LORA":
            self._file.close()
            raise CheckpointError(f"{path}: peft_type is {self.config.get('peft_type')!r}, expected LORA")
        bad = [f"{k} ({why})" for k, why in _UNSUPPORTED_LORA.items() if self.config.get(k)]
        if self.config.get("trainable_token_indices") == []:  # PEFT wraps the embedding for it and then finds no
            bad.append("trainable_token_indices [] (PEFT wraps the embedding for trainable tokens and cannot load an "
                       "adapter without their delta)")  # rows (hostile pass 32, C22); {} wraps nothing
        init = self.config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            bad.append(f"init_lora_weights {init!r} (initialised from the base's own weights, which PEFT replaced by a "
                       "residual at that moment: B·A is not the change to the original base; PEFT's "
                       "save_pretrained(path_initial_model_for_weight_conversion=...) converts it to a plain LoRA)")
        if bad:
            self._file.close()
            raise CheckpointError(f"{path}: this LoRA variant is not supported: {'; '.join(bad)}",
                                  hint="merge the adapter into its base model (PeftModel.merge_and_unload) and "
                                       "merge the full model instead")
        try:
            # module -> (A key, B key, embedding); module-less key -> saved full tensor key
            from .align import _same_bytes  # align imports this module

            self._factors, self._full = _keys_of(self._file.names(), path / ADAPTER_WEIGHTS,
                                                 lambda a, b: _same_bytes(self._file, a, self._file, b))
        except CheckpointError:
            self._file.close()
            raise
        keys = self._file.names()
        known = {k for a, b, _ in self._factors.values() for k in (a, b)}
        unknown = [k for k in keys if (".lora_" in k and k not in known) or ".token_adapter." in k]
        named = next((m for k in unknown if (m := _ADAPTER_NAMED.search(k))), None)
        if named is not None:  # a PeftModel's state_dict() (keys with the adapter's name), not save_pretrained's file
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: its LoRA factors carry the adapter name "
                                  f"{named.group(1) or named.group(2)!r} (e.g. {named.string!r}), as a PeftModel's "
                                  "state_dict() holds them; PEFT loads such factors only under its default name "
                                  "('default') and drops these",
                                  hint="save the adapter with PeftModel.save_pretrained (or peft's "
                                       "get_peft_model_state_dict), which writes the keys PEFT and tiesmerge read")
        if unknown:  # a variant's own tensors (lora_B.bias, a magnitude vector, trainable tokens): never dropped
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds {len(unknown)} LoRA tensor(s) that are not A/B "
                                  f"factors, e.g. {unknown[0]!r}: a LoRA variant tiesmerge does not merge",
                                  hint="merge the adapter into its base model (PeftModel.merge_and_unload) and merge "
                                       "the full model instead")
        if not self._factors and not self._full:
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds no LoRA factors")
        self.targets: dict[str, LoraTarget] = {}  # base tensor name -> target, after bind
        self._full_bound: dict[str, str] = {}  # base tensor name -> saved key
        self._base: Checkpoint | None = None

    # ------------------------------------------------------------------ binding to the base
    def bind(self, base: Checkpoint) -> None:
        """Map every adapted module to a base tensor and check the shapes (raises on mismatch)."""
        if self._base is not None:
            return  # bound once, to the real base (a zero base stands in for it in some merges)
        from .align import _EMBED_SUFFIXES, _HEAD_SUFFIXES  # align imports this module
        source = str(self.path / ADAPTER_CONFIG)
        alpha = _number(self.config.get("lora_alpha", 8), "lora_alpha", source)
        if alpha <= 0:  # PEFT's scale is alpha / r: 0 changes nothing, a negative one undoes the training
            warnings.warn(MergeWarning(
                f"{source}: lora_alpha is {alpha:g}, so the adapter's scale alpha / r is "
                + ("0 and it changes nothing: the merge gets nothing from it" if alpha == 0 else
                   "negative and its change is applied reversed")
                + " (PEFT's default lora_alpha is 8; trained adapters use a positive one)"), stacklevel=3)
        # 1e-320: the float32 scale is 0 or subnormal (hp71a c19); compared as Python floats: numpy cast 1e39 to
        # float32 for the comparison and printed its overflow warning before the typed error (hp78a c29)
        elif alpha < float(np.finfo(np.float32).tiny):
            warnings.warn(MergeWarning(
                f"{source}: lora_alpha is {alpha:g}, below float32's smallest normal number, so the adapter's scale "
                "alpha / r is 0 or nearly in float32 and it changes nothing: the merge gets nothing from it (PEFT's "
                "default lora_alpha is 8)"), stacklevel=3)
        alpha_pattern = _patterns(self.config, "alpha_pattern", source)
        reversed_or_off: list[tuple[str, float]] = []  # modules alpha_pattern gives an alpha <= 0 (hp26 N2)
        rank_pattern = _patterns(self.config, "rank_pattern", source)  # PEFT: a module's r, where a key matches
        rs = bool(self.config.get("use_rslora", False))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        model_types = base_model_types(base)  # the base's own first, then those its config nests
        overruled: list[str] = []
        declared = _declared_rank(self.config, source)
        self._drop_tied_head_twin(base)
        saved = [strip_key(key.split(".modules_to_save.")[0], "") for key in self._full.values()
                 if ".modules_to_save." in key]  # whole copies of modules_to_save, beside the factors
        check_adapted(self.config, list(self._factors), source, whole=saved)  # as PEFT 0.21 decides (peft_targets)
        warn_layout_unknown(model_types, [m for m, (_, _, e) in self._factors.items() if not e], fan_in_fan_out,
                            source)
        targets: dict[str, LoraTarget] = {}
        base_names, claimed = BaseNames(base), {}
        declared_targets = self.config.get("target_modules")
        all_linear = isinstance(declared_targets, str) and declared_targets.lower() == "all-linear"
        embedding_shapes = {tuple(base.info(n).shape) for n in base_names.names if n.endswith(_EMBED_SUFFIXES)} \
            if all_linear else set()
        for module, (a_key, b_key, embedding) in self._factors.items():
            name = base_names.resolve(module, ".weight", self.label, a_key)
            bind_once(claimed, name, a_key, self.label)
            a, b = self._file.info(a_key).shape, self._file.info(b_key).shape
            rank = a[0] if a else 0
            if len(a) in (3, 4, 5) and len(b) == len(a):  # hostile pass 32, C68
                raise CheckpointError(
                    f"{self.label}: the LoRA of {module!r} adapts a convolution (factors A {tuple(a)} and B "
                    f"{tuple(b)}): tiesmerge merges LoRA on linear layers and embeddings only",
                    hint="merge the adapter into its base with PEFT (merge_and_unload) and merge the full model, or "
                         "leave the convolution out of target_modules")
            if len(a) != 2 or len(b) != 2 or b[1] != rank or rank < 1:
                # what is wrong, said as such (hp52 c25: ranks 8 and 9 were told about 2-D factors)
                why = ("each factor is 2-D" if len(a) != 2 or len(b) != 2 else
                       "the rank r is at least 1" if rank < 1 or b[1] < 1 else
                       f"one rank r: A's is {rank}, B's {b[1]}")
                raise IncompatibleCheckpointsError(
                    f"{self.label}: LoRA factors of {module!r} have shapes A {tuple(a)} and B {tuple(b)}; "
                    f"expected A (r, in) and B (out, r), where {why}",
                    hint="the adapter file is incomplete or damaged (PEFT saves both factors of a module with one "
                         "rank): save or download it again")  # not the options' help (hp42 C27)
            stores_in_out = conv1d_layout(model_types, module, fan_in_fan_out)
            if stores_in_out != fan_in_fan_out and not embedding:
                overruled.append(module)
            transposed = embedding or stores_in_out
            full = (a[1], b[0]) if transposed else (b[0], a[1])
            if all_linear and not embedding and tuple(base.info(name).shape) in embedding_shapes:
                raise IncompatibleCheckpointsError(  # hostile pass 32, C87: BERT's cls.predictions.decoder, ...
                    f"{source}: target_modules is all-linear, which leaves out the model's output embedding (PEFT's "
                    f"_maybe_include_all_linear_layers), and {module!r} {tuple(base.info(name).shape)} has the shape "
                    "of the input embedding, as an output head over the vocabulary does; PEFT would load the adapter "
                    "without its factors", hint="the config does not describe these weights: name the modules in "
                                                "target_modules, or save the adapter again with PEFT")
            if tuple(base.info(name).shape) != full:
                ours = tuple(base.info(name).shape)
                # the vocabulary's rows alone differ: a resized vocabulary, said as the saved copies' case says it
                # (hp56 c147: "trained on another base model", and the union hint sent to truncate, which failed)
                resized = embedding and full[1:] == ours[1:]
                raise IncompatibleCheckpointsError(
                    f"{self.label}: LoRA of {module!r} has ΔW = " + ("(B·A)ᵀ" if transposed else "B·A")
                    + f" of shape {full}, which does not fit the base tensor {name!r} {ours}"
                    + (f": the adapter was trained with a resized vocabulary ({full[0]:,} rows, the base {ours[0]:,})"
                       if resized else ""),
                    hint=_RESIZED_HINT if resized else
                    "the adapter was trained on another base model; pass the base it was trained from")
            matched = rank_pattern.lookup(module)
            expected = matched if matched is not None else declared  # PEFT builds the module with this rank
            if rank != expected:  # the scale divides by r: which r is meant matters
                said = f"rank_pattern gives {module!r} r = {expected:g}" if matched is not None else \
                    f"r is {declared}" if "r" in self.config else f"r is not set (PEFT's default r is {declared})"
                fix = "fix the module's rank_pattern entry" if matched is not None else \
                    "fix r (or give the module a rank_pattern entry)"
                raise IncompatibleCheckpointsError(
                    f"{source}: {said} but the LoRA factors of {module!r} have rank {rank} (A {tuple(a)})",
                    hint=f"the config does not describe these weights; {fix}")
            from_pattern = alpha_pattern.lookup(module)
            module_alpha = alpha if from_pattern is None else from_pattern
            if module_alpha <= 0 < alpha:  # lora_alpha's own sign is said above; a pattern's, per adapter, here
                reversed_or_off.append((module, module_alpha))
            scale = module_alpha / (math.sqrt(rank) if rs else rank)
            if not abs(scale) <= MAX_LORA_SCALE:  # lora_alpha 1e300: every product would overflow to Inf
                field = "lora_alpha" if from_pattern is None else "alpha_pattern"
                raise CheckpointError(
                    f"{source}: the adapter's scale for {module!r} ({field} {module_alpha:g} / "
                    + (f"sqrt(r {rank})" if rs else f"r {rank}")  # (hp70a c21: "sqrt(r) 4" of r = 4)
                    + f") is {scale:.3g}, out of range (at most {MAX_LORA_SCALE:g})",
                    hint=f"fix {field} in the adapter config (PEFT's default lora_alpha is 8; a scale is a few units)")
            targets[name] = LoraTarget(module, a_key, b_key, rank, scale, transposed, embedding)
        if reversed_or_off:
            module, value = reversed_or_off[0]
            warnings.warn(MergeWarning(
                f"{source}: alpha_pattern gives {len(reversed_or_off)} module(s) an alpha of 0 or less (e.g. "
                f"{module!r}: {value:g}), so their change is " + ("nothing" if value == 0 else "applied reversed")
                + " (trained adapters use a positive alpha)"), stacklevel=3)
        _warn_if_trained_on_another_base(self.config, base, source)
        if self.fold_like_peft and base_names.rebound:  # hp52 c32: mergekit's fold goes through PEFT's loader
            ours, theirs = base_names.rebound[0]
            warnings.warn(MergeWarning(
                f"{source}: {len(base_names.rebound)} adapted module name(s) such as {ours!r} are not the base's "
                f"(it stores {theirs!r}): tiesmerge binds them by their ending, while PEFT, which mergekit's "
                "model+lora entries load through, binds exact names only and would load none of them (it warns of "
                "missing adapter keys and folds the factors' initial values), so mergekit's output would differ"),
                stacklevel=3)
        if overruled:  # as PEFT warns, and applies the module's own layout
            warnings.warn(MergeWarning(
                f"{source}: fan_in_fan_out is {str(fan_in_fan_out).lower()}, but in the base ({model_types[0]}) "
                f"{len(overruled)} adapted module(s) such as {overruled[0]!r} store their weight as "
                + ("(out, in) (torch.nn.Linear)" if fan_in_fan_out else "(in, out) (transformers' Conv1D)")
                + ", so ΔW is applied in that layout, as PEFT does when it loads the adapter"), stacklevel=3)
        full_bound: dict[str, str] = {}
        follows = _heads_following_the_embedding(self._full, self._file, base, self.label)
        for plain, key in self._full.items():
            _refuse_unloaded_whole(key, self._factors, self.label)
            if plain in follows:
                continue  # ensure_weight_tying's copy of the head: the embedding's own bytes, merged once as it
            name = base_names.resolve(strip_key(plain, ""), "", self.label, key)
            bind_once(full_bound, name, key, self.label)
            if tuple(base.info(name).shape) != tuple(self._file.info(key).shape):
                theirs, ours = tuple(self._file.info(key).shape), tuple(base.info(name).shape)
                resized = name.endswith(_EMBED_SUFFIXES + _HEAD_SUFFIXES) and theirs[1:] == ours[1:]
                raise IncompatibleCheckpointsError(
                    f"{self.label}: saved tensor {key!r} {theirs} does not fit the base tensor {name!r} {ours}"
                    + (f": the adapter was trained with a resized vocabulary ({theirs[0]:,} rows, the base "
                       f"{ours[0]:,})" if resized else ""),
                    hint=_RESIZED_HINT if resized else  # hostile pass 32, C143
                    "the adapter was trained on another base model: pass the base it was trained from (its saved "
                    "copy of this tensor, modules_to_save, has that base's shape)")  # (hp87a c119: --help's hint)
            full_bound[name] = key
        self.targets, self._full_bound, self._base = targets, full_bound, base

    def _drop_tied_head_twin(self, base: Checkpoint) -> None:
        """With ensure_weight_tying, PEFT adapts the output head of a base that ties it to an adapted embedding with
        the embedding's own factors, transposed (and saves them, and the head's base_layer, though target_modules
        names only the embedding): the same ΔW, which the tied output holds once, as the embedding's. Those twins are
        left out; a head whose factors are not the embedding's is kept, to be refused as a change to a tied head
        (hostile pass 31, C79)."""
        from .align import _EMBED_SUFFIXES, _HEAD_SUFFIXES, _same_bytes, read_model_config, ties_word_embeddings

        if self.config.get("ensure_weight_tying") is not True:
            return
        if not ties_word_embeddings(read_model_config(base)):
            return
        heads = tuple(s.removesuffix(".weight") for s in _HEAD_SUFFIXES)
        embeds = [(m, f) for m, f in self._factors.items() if f[2] and (m + ".weight").endswith(_EMBED_SUFFIXES)]
        if len(embeds) != 1:
            return
        embed, (embed_a, embed_b, _) = embeds[0]
        a_e, b_e = self._file.read(embed_a), self._file.read(embed_b)  # (r, vocab), (hidden, r): small
        for module, (a_key, b_key, embedding) in list(self._factors.items()):
            if embedding or not module.endswith(heads):
                continue
            a_h, b_h = self._file.read(a_key), self._file.read(b_key)  # (r, hidden), (vocab, r)
            if a_h.shape != b_e.T.shape or b_h.shape != a_e.T.shape or not (a_h.equal(b_e.T) and b_h.equal(a_e.T)):
                continue
            del self._factors[module]
            whole = {strip_key(plain, ""): plain for plain in self._full}  # the file's names, PEFT's prefix off
            own, twin = whole.get(module + ".weight"), whole.get(embed + ".weight")  # the two base_layer copies
            if own is not None and twin is not None and ".base_layer." in self._full[own] and \
                    _same_bytes(self._file, self._full[own], self._file, self._full[twin]):
                del self._full[own]

    def _require_bound(self) -> Checkpoint:
        if self._base is None:
            raise RuntimeError(f"{self.label}: bind(base) the adapter before reading it")
        return self._base

    # ------------------------------------------------------------------ the Checkpoint protocol
    def names(self) -> list[str]:
        self._require_bound()
        return [*self.targets, *(n for n in self._full_bound if n not in self.targets)]

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(tuple(self._require_bound().info(name).shape), FLOAT32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """τ's rows in float32: s · B[rows] · A (or its transpose), saved − base, or zeros."""
        base = self._require_bound()
        target = self.targets.get(name)
        key = self._full_bound.get(name)
        if self.fold_like_peft and (target is not None or key is not None) and not isinstance(base, ZeroBase):
            return self._folded(base, name, target, key, rows)
        saved = None if key is None else self._file.read(key, rows).float().sub_(base.read(name, rows).float())
        if target is not None:
            # over at least _MIN_PRODUCT_ROWS rows, then cut: a few rows' matmul rounds otherwise than a larger
            # chunk's, so the merge would depend on --memory-budget (hp53 c20: 8 MiB and 2 GiB differed)
            total = self._file.info(target.a_key if target.transposed else target.b_key).shape[
                1 if target.transposed else 0]
            window = None if rows is None else _widened(rows, total)
            if target.transposed:  # ΔW = s (B A)^T: rows of ΔW are columns of A
                a = self._file.read(target.a_key).float()  # (r, rows_total)
                a = a if window is None else a[:, window]
                b = self._file.read(target.b_key).float()  # (cols, r)
                delta = a.T @ b.T  # (window rows, cols)
            else:
                b = self._file.read(target.b_key, window).float()  # (window rows, r)
                delta = b @ self._file.read(target.a_key).float()  # (window rows, in)
            delta = _cut(delta, rows, window, total).mul_(target.scale)  # (rows, ...)
            if not self._underflow_said and not bool(delta.any()) and bool(b.any()):  # B = 0: untrained, not lost
                self._say_underflow(name, target)
            # a saved copy of the adapted weight (an embedding's base_layer) adds its own change
            return delta if saved is None else delta.add_(saved)
        if saved is not None:
            return saved
        import torch

        return torch.zeros(rows_shape(base.info(name).shape, rows), dtype=torch.float32)

    _underflow_said = False

    def _say_underflow(self, name: str, target: LoraTarget) -> None:
        """Once per adapter: its update s·B·A of a tensor is 0 in float32 though B and A are not (factors of 1e-23
        whose product, 1e-46, is below float32's range: the merge then equals the base there, hp74a c42, c43)."""
        a = self._file.read(target.a_key).double()
        b = self._file.read(target.b_key).double()
        exact = float(((a.T @ b.T) if target.transposed else (b @ a)).abs().max()) * abs(target.scale)
        if exact == 0.0:  # B·A is 0 itself (rows of B zero where A's columns are): nothing lost
            return
        self._underflow_said = True
        warnings.warn(MergeWarning(
            f"{self.path / ADAPTER_WEIGHTS}: the adapter's update of {name!r} (s·B·A, at most {exact:.2g}) is below "
            "float32's range, so it is 0 there and the adapter changes nothing of it (said once per adapter); "
            "factors this small are no training: check the adapter's factors and lora_alpha"), stacklevel=4)

    def _folded(self, base: Checkpoint, name: str, target: LoraTarget | None, key: str | None,
                rows: slice | None) -> torch.Tensor:
        """τ's rows as mergekit gets them for a MODEL+LORA entry (hp48 c05: up to 1.8e-3 apart on a bfloat16 base):
        transformers loads the base in its weights' own dtype (mergekit passes no dtype: hp49 c11), PEFT loads the
        adapter's saved copies into those modules (cast to their dtype: hp49 c05) and, its factors upcast to float32,
        adds ΔW = s·(B A) in place (a Linear: ``weight += ΔW``, one rounding; an Embedding: ``weight +=
        ΔW.to(dtype)``, two: hp49 c02), and the merge reads the folded weights: τ = float(folded) − float(W)."""
        import torch

        stored = base.read(name, rows)  # (rows, ...)
        w = stored.to(self._module_dtype(base, name, stored.dtype))  # the module's weight as transformers loads it
        loaded = w if key is None else self._file.read(key, rows).to(w.dtype)  # a saved copy, cast on loading
        if key is not None and w.is_floating_point() and not bool(torch.isfinite(loaded).all()) and \
                bool(torch.isfinite(self._file.read(key, rows)).all()):  # finite in the file: the cast overflowed
            self._refuse_past_float32(name, rows)  # past float32 too: no base dtype can hold it
            raise InvalidTensorError(
                f"{self.path / ADAPTER_WEIGHTS}: the adapter's saved copy {key!r} holds values past the base's "
                f"{str(w.dtype).removeprefix('torch.')}, into which PEFT loads it for mergekit's MODEL+LORA entry "
                "(mergekit writes Inf there)",  # (hp50 c03: said as a damaged adapter)
                hint="give the base in float32 (its weights converted), or merge the adapter as a model of its own "
                     "with the command line (--base BASE --model ADAPTER), which keeps the copy in float32")
        if target is None:
            return loaded.float() - stored.float()
        # PEFT's factors: float32 (upcast from half precision), float64 in a float64 model (hp50 c17); read only to
        # form a product, not for each chunk sliced from a kept one
        wide = torch.float64 if w.dtype == torch.float64 else torch.float32
        # B (out, r) · A (r, in): the product's bytes from the headers
        size = self._file.info(target.b_key).shape[0] * self._file.info(target.a_key).shape[1] * \
            (8 if wide == torch.float64 else 4)

        def factors() -> tuple[Any, Any]:  # (r, in), (out, r)
            return self._file.read(target.a_key).to(wide), self._file.read(target.b_key).to(wide)

        kept = self._fold_product is not None and self._fold_product[0] == name
        if not kept:  # this adapter's previous tensor's product: done with
            _release_product(self)
        if rows is None or not kept and not _may_hold(size):
            a, b = factors()
            # an embedding of 152k x 8192 rows: the chunk's own product (hp49 c46: 5 GB past the budget); formed
            # over at least _MIN_PRODUCT_ROWS rows, then cut: a matmul of a few rows takes another kernel, which
            # rounds otherwise than the whole product's (hp52 c01: 1-9 rows, 136 values a bf16 ulp off mergekit)
            total = a.shape[1] if target.transposed else b.shape[0]
            window = None if rows is None else _widened(rows, total)
            delta = (b @ (a if window is None else a[:, window])).T if target.transposed else \
                (b if window is None else b[window]) @ a  # (window rows, ...)
            delta = _cut(delta, rows, window, total)  # (rows, ...)
        else:
            # each adapter keeps its tensor's product while its chunks are read (evicting one per chunk rebuilt it per
            # chunk: hp51 c09, 139 s), all of them within _WHOLE_PRODUCT_BYTES together (hp50 c16), each dropped at
            # the adapter's next tensor and at its close; a key of the adapter's own (an id() is reused: hp51 c03)
            cached = self._fold_product
            if cached is None or cached[0] != name:
                a, b = factors()
                product = b @ a  # (out, in): PEFT's whole product (a chunk's own rows could round otherwise)
                product = product.T if target.transposed else product
                _HELD_BYTES[self._token] = size
                cached = self._fold_product = (name, product)
            delta = cached[1][rows]
        delta = delta * target.scale  # then the scale, as PEFT
        folded = loaded.clone()
        folded += delta.to(w.dtype) if target.embedding else delta  # PEFT's in-place adds (see above)
        return folded.float() - stored.float()  # the merge reads the base as stored

    def _module_dtype(self, base: Checkpoint, name: str, stored_dtype: Any) -> Any:
        if self._load_dtypes is None:
            self._load_dtypes = LoadDtypes(base)
        return self._load_dtypes.of(name, stored_dtype)

    def rank_bound(self, name: str) -> int | None:
        """An upper bound on the rank of ``name``'s task vector that the adapter's structure gives: r for
        s · B · A, 0 for a tensor the adapter leaves alone, None (no bound) for one it saves whole.
        Merges that decompose task vectors (TSV-M, Iso-C) use it: a sum of eight rank-8 updates is rank 64,
        which its singular values alone do not always show (the drop after the 64th can be as shallow as
        2e-4 of the previous value)."""
        self._require_bound()
        if name in self._full_bound:
            return None
        target = self.targets.get(name)
        return 0 if target is None else target.rank

    def explain_not_finite(self, name: str) -> None:
        """Called by the readers where ``read(name)`` held Inf or NaN, to name the cause: factors holding Inf or
        NaN are damage (named by key); finite factors whose product overflows float32 are an adapter no model can
        use (lora_A = lora_B = 1e20). Returns where neither applies (a saved full tensor's values)."""
        import torch

        self._refuse_past_float32(name)
        target = self.targets.get(name)
        if target is None:
            return
        a, b = self._file.read(target.a_key).float(), self._file.read(target.b_key).float()
        for key, factor in ((target.a_key, a), (target.b_key, b)):
            if not bool(torch.isfinite(factor).all()):
                kind = "NaN" if bool(torch.isnan(factor).any()) else "Inf"
                raise InvalidTensorError(f"{self.path / ADAPTER_WEIGHTS}: the LoRA factor {key!r} holds {kind}",
                                         hint="the adapter is damaged or was saved after a diverged training step; "
                                              "merge another one")
        if bool(torch.isfinite((b @ a).mul_(target.scale)).all()):
            if self.fold_like_peft and self._base is not None:  # the fold in the base's own dtype overflowed it
                stored = self._base.info(name).dtype_info.torch  # (hp49 c38: a healthy adapter called damaged)
                raise fold_overflow(str(self.path / ADAPTER_WEIGHTS), f"folding the update s·B·A of {target.module!r}",
                                    name, stored, self._module_dtype(self._base, name, stored), "MODEL+LORA",
                                    "which adds s·B·A in float32")
            return  # the product is finite: the cause is a tensor saved whole beside it, named by the caller
        raise InvalidTensorError(
            f"{self.path / ADAPTER_WEIGHTS}: the update s·B·A of {target.module!r} (the base's {name!r}) overflows "
            f"float32: its factors are finite (|A| up to {float(a.abs().max()):.3g}, |B| up to "
            f"{float(b.abs().max()):.3g}, scale {target.scale:.3g}) but their product is past 3.4e38",
            hint="no model can use this adapter; check how it was saved (or rescale its factors)")

    def _refuse_past_float32(self, name: str, rows: slice | None = None) -> None:
        """A copy saved whole for ``name`` in float64 with finite values past float32's range: said as such, not as
        damage nor as a dtype the base could widen (hp51 c07: 1e39 was hinted "give the base in float32")."""
        import torch

        from ..engine.reader import check_float32_range  # the engine imports this module

        key = self._full_bound.get(name)
        if key is None or self._file.info(key).dtype != torch.float64:
            return
        raw = self._file.read(key, rows)
        check_float32_range(str(self.path / ADAPTER_WEIGHTS), key, tuple(self._file.info(key).shape), raw.numpy())

    def location(self, name: str) -> str:
        return str(self.path / ADAPTER_WEIGHTS)

    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]

    def directory(self) -> Path | None:
        return self.path

    def full_key(self, name: str) -> str | None:
        """The adapter's key of a tensor it stores whole (modules_to_save, biases), or None."""
        return self._full_bound.get(name)

    def close(self) -> None:
        _release_product(self)
        self._file.close()


class ZeroBase:
    """The base's names, shapes and dtypes, with every value 0.

    Merging adapters (which yield τ directly) against it returns λ·τ_m itself rather than
    base + λ·τ_m: what a merged adapter is factored from, with no base added and subtracted."""

    def __init__(self, base: Checkpoint) -> None:
        self.base, self.label = base, base.label

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        import torch

        info = self.base.info(name)
        return torch.zeros(rows_shape(info.shape, rows), dtype=info.dtype)

    def read_into(self, name: str, rows: slice | None, out: memoryview) -> None:
        """Zeros as stored bytes (0 is all zero bits in every dtype), without torch."""
        info = self.base.info(name)
        nbytes = math.prod(rows_shape(info.shape, rows)) * info.itemsize
        if len(out) != nbytes:
            raise ValueError(f"{name}: buffer of {len(out)} bytes for {nbytes} bytes of rows")
        np.frombuffer(out, dtype=np.uint8).fill(0)

    def location(self, name: str) -> str:
        return self.base.location(name)

    def files(self) -> list[Path]:
        return self.base.files()

    def directory(self) -> Path | None:
        return self.base.directory()

    def close(self) -> None:
        pass


def open_adapter(path: Path, label: str) -> LoraCheckpoint | Ia3Checkpoint:
    """A PEFT adapter directory, by its ``peft_type``."""
    inside(path / ADAPTER_CONFIG, path, "the adapter config")  # a link leaving the adapter is not read
    config = read_json(path / ADAPTER_CONFIG, "the adapter config", finite=True,  # written again (hp70a c46)
                       unique_keys=True)  # a key twice (lora_alpha 16, then 1600): refused (hp88a c76)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: holds a {type(config).__name__}, not a JSON object",
                              hint="an adapter config is the adapter_config.json PEFT writes")
    written = str(config.get("peft_type", ""))[:40]
    kind = written.upper()
    if kind in ("LORA", "IA3") and written != kind:  # hostile pass 31, C93: PEFT's PeftType values are upper case
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: peft_type is {written!r}; PEFT reads {kind!r} only (its "
                              "PeftType) and cannot load this adapter", hint=f"write \"peft_type\": \"{kind}\" in the "
                                                                           "adapter config, as PEFT does")
    if kind == "LORA":
        return LoraCheckpoint(path, label)
    if kind == "IA3":
        return Ia3Checkpoint(path, label)
    raise CheckpointError(f"{path}: PEFT adapters of type {kind or '(none)'} are not supported",
                          hint="tiesmerge reads LoRA and (IA)³ adapters")


def _model_config(base: Checkpoint) -> dict:
    from .align import read_model_config  # align imports this module

    return read_model_config(base)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _warn_if_trained_on_another_base(config: dict, base: Checkpoint, source: str) -> None:
    """The adapter names the model it was trained on (base_model_name_or_path); where the base's config names itself
    (_name_or_path) and both are hub ids (org/name) that differ, the shapes may still fit (two fine-tunes of one
    architecture) while the weights are another model's: said, not refused (a re-upload under another name is the
    same model)."""
    claimed = config.get("base_model_name_or_path")
    try:
        own = _model_config(base).get("_name_or_path")
    except CheckpointError:
        return
    if not (isinstance(claimed, str) and isinstance(own, str)) or not (_HUB_ID.fullmatch(claimed)
                                                                         and _HUB_ID.fullmatch(own)):
        return  # a local path on either side names nothing to compare
    if claimed.lower() != own.lower():
        warnings.warn(MergeWarning(
            f"{source}: the adapter was trained on {claimed!r} (base_model_name_or_path), and the base's config names "
            f"{own!r}: the shapes fit, but if the weights differ the merged model is not what the adapter learned"),
            stacklevel=4)
