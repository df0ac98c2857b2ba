"""Which tensors merge, which are copied, and how the inputs line up.

Rules: every input has the base's floating tensor names and shapes (else a typed error that
names the first differing tensors with every model's shape); integer and bool tensors are
copied from the base; tied tensors (an output head sharing the input embedding) merge once
and are written under every name; a vocabulary-size mismatch is an error unless the policy
``truncate`` keeps the base's rows, which the manifest records.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..dtypes import DType, as_dtype
from ..errors import CheckpointError, ConfigError, IncompatibleCheckpointsError, MergeWarning
from ..limits import read_json
from ..paths import inside
from ..unicode_names import code_points, first_twin
from .peft import yields_task_vector
from .protocol import Checkpoint, read_rows_into, rows_shape
from .vocab_rows import VOCAB_SUFFIXES

if TYPE_CHECKING:
    import torch

__all__ = ["TensorJob", "Alignment", "align", "with_parts", "read_model_config", "VOCAB_POLICIES"]

VOCAB_POLICIES = ("error", "truncate", "union")  # union: see io.vocab and io.vocab_rows
_HEAD_SUFFIXES = ("lm_head.weight", "predictions.decoder.weight", "embed_out.weight")
_EMBED_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "shared.weight", "embed_in.weight")


@dataclass(frozen=True, init=False)
class TensorJob:
    """One output tensor (or group of tied tensors) and how to produce it.

    Built with a ``DType``, a torch dtype or a dtype name; planning reads ``dtype_info``,
    ``itemsize`` and ``nbytes`` (no torch), computing code ``dtype`` (a torch dtype).
    """

    name: str  # the name read from every input
    shape: tuple[int, ...]  # output shape: the base's
    dtype_info: DType  # the base's dtype
    merge: bool  # False: copied from the base
    aliases: tuple[str, ...] = ()  # tied names written with the same values

    def __init__(self, name: str, shape: Sequence[int], dtype: DType | str | torch.dtype, merge: bool,
                 aliases: Sequence[str] = ()) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype_info", as_dtype(dtype))
        object.__setattr__(self, "merge", merge)
        object.__setattr__(self, "aliases", tuple(aliases))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return self.dtype_info.torch

    @property
    def itemsize(self) -> int:
        return self.dtype_info.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype_info.is_floating

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype_info.itemsize

    def output_dtype(self, out: DType | None) -> DType:
        """The dtype this tensor is written in, given the requested output dtype ``out`` (None: as
        stored). Merged tensors and floating tensors copied from the base take ``out``, so a
        ``--dtype float16`` output holds no float32 leftovers (the config's torch_dtype says
        float16); integer and bool tensors (position ids, masks) keep theirs."""
        return out if out is not None and (self.merge or self.is_floating) else self.dtype_info

    def cast_on_copy(self, out: DType | None) -> bool:
        """Whether a tensor copied from the base changes dtype on the way out (see ``output_dtype``)."""
        return not self.merge and self.output_dtype(out) != self.dtype_info


@dataclass(frozen=True)
class Alignment:
    jobs: tuple[TensorJob, ...]
    tied: tuple[tuple[str, ...], ...] = ()
    truncated: tuple[dict, ...] = field(default=())  # {"tensor", "model", "from_rows", "to_rows"}
    # vocabulary union: part job -> (the output tensor it continues, its first row); the part's
    # job follows the tensor's own, and holds the tensor's tied aliases (written after both)
    routes: tuple[tuple[str, str, int], ...] = ()
    vocab: dict | None = None  # the union, for the manifest

    def merged_numel(self) -> int:
        return sum(j.numel for j in self.jobs if j.merge)

    def outputs(self) -> tuple[TensorJob, ...]:
        """The output's tensors: each part folded into its tensor (full rows, the part's aliases)."""
        if not self.routes:
            return self.jobs
        parts = {p: (name, first) for p, name, first in self.routes}
        by_name = {j.name: j for j in self.jobs}
        grown: dict[str, TensorJob] = {}
        for p, (name, first) in parts.items():
            job, part = by_name[name], by_name[p]
            grown[name] = TensorJob(name, (first + part.shape[0], *job.shape[1:]), job.dtype_info, job.merge,
                                    part.aliases)
        return tuple(grown.get(j.name, j) for j in self.jobs if j.name not in parts)

    def route(self, sink: Any) -> Any:
        """``sink`` as the executor writes to it: a part's rows land in its tensor, after the base's."""
        if not self.routes:
            return sink
        rows = {j.name: j.shape[0] for j in self.jobs}
        return _Routed(sink, {p: (name, first, rows[p]) for p, name, first in self.routes})


class _Routed:
    """Writes a vocabulary part's rows into its tensor, and its aliases as the tensor's."""

    def __init__(self, sink: Any, parts: dict[str, tuple[str, int, int]]) -> None:
        self.sink, self.parts = sink, parts

    def write(self, name: str, rows: slice | None, chunk: Any) -> None:
        if name in self.parts:
            name, first, count = self.parts[name]
            lo, hi = (0, count) if rows is None else rows.indices(count)[:2]
            rows = slice(first + lo, first + hi)
        self.sink.write(name, rows, chunk)

    def alias(self, name: str, source: str) -> None:
        self.sink.alias(name, self.parts[source][0] if source in self.parts else source)


def with_parts(alignment: Alignment, base: Checkpoint, routes: dict[str, tuple[str, int]], vocab: dict) -> Alignment:
    """The alignment with each vocabulary part job right after its tensor's job (``base``: the
    base's union view, which reads the parts); the tensor's tied aliases move onto its part."""
    jobs: list[TensorJob] = []
    have = {j.name for j in alignment.jobs}
    routes = {p: r for p, r in routes.items() if r[0] in have}  # a tied head is written as its embedding
    by_tensor = {name: p for p, (name, _) in routes.items()}
    for job in alignment.jobs:
        part = by_tensor.get(job.name)
        if part is None:
            jobs.append(job)
            continue
        info = base.info(part)
        jobs.append(TensorJob(job.name, job.shape, job.dtype_info, job.merge))
        jobs.append(TensorJob(part, info.shape, info.dtype_info, merge=False, aliases=job.aliases))
    return Alignment(tuple(jobs), alignment.tied, alignment.truncated,
                     tuple((p, name, first) for p, (name, first) in routes.items()), vocab)


def read_model_config(ckpt: Checkpoint) -> dict:
    """The model's config.json as a dict ({} where it has none), read as every model file is: inside the model,
    a regular file, with size and depth limits."""
    directory = ckpt.directory()
    if directory is None or not os.path.lexists(directory / "config.json"):
        return {}
    inside(directory / "config.json", directory, "the model's config")  # a link leaving the model is not read
    config = read_json(directory / "config.json", "the model's config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'}: holds a {type(config).__name__}, not a JSON object, "
                              "so it is not a model config", hint="fix or remove the model's config.json")
    return config


def ties_word_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether transformers ties this model's output head to its input embedding: the config's tie_word_embeddings,
    else the default of the config class its model_type names (Llama, Mistral, Qwen2: untied; GPT-2, BERT, Gemma:
    tied), else PretrainedConfig's (tied). A config without the key was taken as tied, and an untied Llama refused
    (hp56 c90, c169)."""
    value = config.get("tie_word_embeddings")
    if isinstance(value, bool):
        return value
    model_type = config.get("model_type")
    return _class_ties(model_type) if isinstance(model_type, str) else True


@functools.lru_cache(maxsize=64)
def _class_ties(model_type: str) -> bool:
    """tie_word_embeddings' default in transformers' own config class for ``model_type`` (its configuration module,
    never a model's code); True where transformers or the class is missing or names no default."""
    try:
        import inspect

        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
        default = inspect.signature(cls.__init__).parameters["tie_word_embeddings"].default
    except Exception:  # noqa: BLE001 -- no transformers, an unknown type, a class without the parameter
        return True
    return default if isinstance(default, bool) else True


def _tied_groups(base: Checkpoint, names: list[str]) -> list[tuple[str, ...]]:
    """Groups of names that are one tensor: aliasing memory, or an output head tied by config."""
    if hasattr(base, "storage_key"):  # in memory: tensors that view the same memory are one
        groups: dict[tuple, list[str]] = {}
        for name in names:
            key = base.storage_key(name)
            if key is not None:
                groups.setdefault(key, []).append(name)
        return [tuple(g) for g in groups.values() if len(g) > 1]
    if not ties_word_embeddings(read_model_config(base)):
        return []
    heads = [n for n in names if n.endswith(_HEAD_SUFFIXES)]
    embeds = [n for n in names if n.endswith(_EMBED_SUFFIXES)]
    out = []
    for head in heads:
        same = [e for e in embeds if base.info(e).shape == base.info(head).shape]
        if len(same) == 1:
            out.append((same[0], head))
    return out


def _untied_copies(base: Checkpoint, model: Checkpoint, k: int, extra: list[str]) -> list[str]:
    """``extra`` (model ``k``'s tensors the base lacks) less the output heads that are byte for byte the model's own
    embedding where the base ties them (its config; a writer that does not deduplicate tied tensors stores the head
    anyway): the same tensor, merged once as the embedding. A head that differs from the embedding was trained
    untied, and merging it tied would drop its change: that is an error that says so."""
    if not extra or yields_task_vector(model) or not ties_word_embeddings(read_model_config(base)):
        return extra
    embeds = [n for n in model.names() if n.endswith(_EMBED_SUFFIXES) and n in base.names()]
    left = []
    for name in extra:
        twin = next((e for e in embeds if model.info(e) == model.info(name)), None) \
            if name.endswith(_HEAD_SUFFIXES) else None
        if twin is None:
            left.append(name)
        elif not _same_values([model], twin, name):
            raise IncompatibleCheckpointsError(
                f"model {k} ({model.label}) stores {name!r} with values other than its {twin!r}, and the base ties the "
                "two (tie_word_embeddings): this model was fine-tuned with an untied output head, which a merge into "
                "the tied base would drop",
                hint="merge onto a base whose config sets tie_word_embeddings: false and stores the head (a copy of "
                     "the embedding), or leave this model out")
    return left


def _refuse_head_changed_apart(base: Checkpoint, models: list[Checkpoint], group: tuple[str, ...]) -> None:
    """The base ties its output head to its embedding (config) and stores the one tensor under both names; a model
    that changes the head apart from the embedding (an adapter on lm_head, a fine-tune trained untied) would lose that
    change where transformers ties the two again when it loads the output (hostile pass 30, F1). A model that changes
    only the embedding is fine: the head follows it."""
    embed, head = group[0], group[1]
    if not _same_values([base], embed, head):
        return  # the base itself stores two tensors: nothing is tied in its files
    for k, model in enumerate(models):
        if _same_values([model], embed, head):
            continue
        changed = head in model.names() if yields_task_vector(model) else not _same_bytes(base, head, model, head)
        if changed:
            adapter = yields_task_vector(model)
            raise IncompatibleCheckpointsError(
                f"model {k} ({model.label}) changes {head!r} apart from {embed!r}, which the base ({base.label}) ties "
                "(tie_word_embeddings) and stores as one tensor: loaded with the base's config, the output's head "
                "would be its embedding again and the change would be lost"
                + (" (an adapter on a tied head: PEFT's merge changes the shared matrix, the embedding too)"
                   if adapter else ""),
                hint=("merge the adapter into its base with PEFT (merge_and_unload) and merge the full model, or "
                      "train it without lm_head in target_modules") if adapter else
                     "merge onto a base whose config sets tie_word_embeddings: false, or leave this model out")


def _first_rows(ckpt: Checkpoint, name: str, rows: slice | None) -> bytes:
    info = ckpt.info(name)
    out = bytearray(math.prod(rows_shape(info.shape, rows)) * info.itemsize)
    read_rows_into(ckpt, name, rows, memoryview(out))
    return bytes(out)


_COMPARE_BYTES = 16 << 20  # rows compared per read: memory stays bounded for any embedding

# whether the running command offers --vocab-policy union (merge, validate, the API's merge); analyze, tune and
# search take error or truncate only, so their hints never name union (the command line sets this per command)
union_offered = True
# how the running command spells the vocabulary policies in a hint: a mergekit recipe has no --vocab-policy (refused
# over it), its tokenizer_source says the same (hp45 c04: the hint named the refused flag)
POLICY_FLAGS = {"union": "--vocab-policy union (vocab_policy='union')", "truncate": "--vocab-policy truncate"}
policy_words = dict(POLICY_FLAGS)  # a mergekit recipe: its own key (cli.commands._mergekit_words)


def _models_changing(base: Checkpoint, models: Sequence[Checkpoint], model_names: Sequence[set[str]], name: str
                     ) -> list[int]:
    """The models whose integer tensor ``name`` (of at most 16 MiB: a buffer) holds other bytes than the base's
    (``model_names``: each model's names)."""
    info = base.info(name)
    held = [k for k, m in enumerate(models) if not yields_task_vector(m) and name in model_names[k]
            and not m.info(name).is_floating]  # (one stored as floats is said by the caller's own warning)
    # another shape or integer dtype holds other values too, told without reading (hp88a c71: dropped silently)
    other = [k for k in held if models[k].info(name).dtype_info != info.dtype_info
             or tuple(models[k].info(name).shape) != tuple(info.shape)]
    if info.nbytes > _COMPARE_BYTES:
        return other
    mine = _first_rows(base, name, None)
    return sorted({*other, *(k for k in held if k not in other and _first_rows(models[k], name, None) != mine)})


def _same_values(ckpts: list[Checkpoint], a: str, b: str) -> bool:
    """Whether two names hold one tensor in every input: every row's bytes compared, in chunks
    (files: read as stored, no torch). Only files that store both names pay this; a model
    saved with tied weights usually stores one. Comparing only a few rows would let a head that
    differs further down be merged as a copy of the embedding."""
    for ckpt in ckpts:
        if ckpt.info(a) != ckpt.info(b):
            return False
        if yields_task_vector(ckpt) and a not in ckpt.names() and b not in ckpt.names():
            continue  # an adapter that changes neither: τ = 0 for both
        if not _same_bytes(ckpt, a, ckpt, b):
            return False
    return True


def _same_bytes(x: Checkpoint, x_name: str, y: Checkpoint, y_name: str) -> bool:
    """Whether tensor ``x_name`` of ``x`` and ``y_name`` of ``y`` hold the same bytes, compared in chunks of rows
    (an output head may be GBs)."""
    info = x.info(x_name)
    if info != y.info(y_name):
        return False
    if not info.shape:
        return _first_rows(x, x_name, None) == _first_rows(y, y_name, None)
    step = max(1, _COMPARE_BYTES // max(1, math.prod(info.shape[1:]) * info.itemsize))
    return all(_first_rows(x, x_name, rows) == _first_rows(y, y_name, rows)
               for rows in (slice(i, min(i + step, info.shape[0])) for i in range(0, info.shape[0], step)))


# a PEFT LoRA factor's name: "base_model.model.<module>.lora_A.weight", ".lora_embedding_B", "lora_A.default.weight"
# buffers that transformers recomputes from the config when it builds a model (non-persistent since 4.31), which
# checkpoints saved by older versions hold: not weights, so a model that lacks one still matches its base
_RECOMPUTED = re.compile(r"(?:^|\.)rotary_emb\.inv_freq$")
_PEFT_FACTOR = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.|$)")


def _normalization_twin(missing: list[str], extra: list[str], base_names: Iterable[str], model_names: Iterable[str]
                        ) -> tuple[str, str] | None:
    """(a name one input lacks, the name it holds instead) that differ only in Unicode normalization: a missing name
    and an extra one, or either beside a name both inputs hold (hp72a c10, c35: a model holding both forms)."""
    lacked = set(missing)
    found = first_twin(missing, (n for n in model_names if n not in lacked))  # the base's name; the model's form
    if found is not None:
        return found
    added = set(extra)
    found = first_twin(extra, (n for n in base_names if n not in added))  # the model's name; the base's form
    return (found[1], found[0]) if found is not None else None


def _prefix_apart(missing: list[str], extra: list[str]) -> str | None:
    """The one leading component (``model.``) by which every missing name differs from an extra one, or None."""
    if not missing or len(missing) != len(extra):
        return None
    longer, shorter = (missing, set(extra)) if len(missing[0]) > len(extra[0]) else (extra, set(missing))
    prefixes = {n.split(".", 1)[0] + "." for n in longer if "." in n}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    return prefix if all(n.startswith(prefix) and n[len(prefix):] in shorter for n in longer) else None


def _shapes_table(name: str, base: Checkpoint, models: list[Checkpoint]) -> str:
    def show(c: Checkpoint) -> str:
        if name not in c.names():
            return "missing"
        i = c.info(name)
        return f"{tuple(i.shape)} {i.dtype_info.name}"

    lines = [f"    base     {show(base):<28} {base.label}"]  # as wide as "model k "
    lines += [f"    model {k:<2} {show(m):<28} {m.label}" for k, m in enumerate(models)]
    return "\n".join(lines)


def _covered(base: Checkpoint, models: list[Checkpoint]) -> set[str]:
    """Base tensors that some input changes: all of them if any input is a full model, else the
    union of the adapters' targets. The rest are copied from the base (every τ there is 0), so
    a global trim ranks only the real weight changes."""
    if any(not yields_task_vector(m) for m in models):
        return set(base.names())
    return {name for m in models for name in m.names()}


def align(base: Checkpoint, models: list[Checkpoint], *, vocab_policy: str = "error") -> Alignment:
    if vocab_policy not in VOCAB_POLICIES:
        raise ConfigError(f"vocab_policy={vocab_policy!r} is not one of {', '.join(VOCAB_POLICIES)}")
    names = base.names()
    if not names:  # an empty weights file (save_file({})) or state dict: a "merge" would write an empty model
        raise IncompatibleCheckpointsError(f"{base.label}: the base holds no tensors",
                                           hint="pass the base model's weights (a folder or a .safetensors file "
                                                "holding its parameters)")
    base_set = set(names)
    # -- adapters yield task vectors over the base's tensors they target (τ = 0 elsewhere)
    for model in models:
        if yields_task_vector(model):
            model.bind(base)  # type: ignore[attr-defined]
    covered = _covered(base, models)
    # -- names: every floating base tensor must be in every model, and no model has extras
    for ckpt, role in ((base, "the base"), *((m, f"model {k}") for k, m in enumerate(models))):
        unlisted = getattr(ckpt, "unindexed", {})
        if not unlisted:
            continue
        # every tensor a shard holds and the index leaves out: transformers loads it (it reads whole shards), so a
        # merge that skipped it would write another model than the one that runs: one the merge needs, or one only
        # this input holds (merged silently without it, hp37b I02; a state dict with that extra key is refused)
        lost = sorted(unlisted)
        if lost:
            raise IncompatibleCheckpointsError(
                f"{ckpt.location(lost[0])}: {role}'s index (model.safetensors.index.json) does not list "
                f"{len(lost)} tensor(s) its shards hold, first {lost[0]!r} in {unlisted[lost[0]].name}",
                hint="the index is incomplete: regenerate it (or fetch it again) so that weight_map names every "
                     "tensor")
    model_names = [set(m.names()) for m in models]  # looked up per tensor below: sets, not the names() lists
    for k, model in enumerate(models):
        have = model_names[k]
        missing = [] if yields_task_vector(model) else \
            [n for n in names if n not in have and base.info(n).is_floating]
        # a buffer transformers recomputes at load, which older versions saved (rotary inv_freq): the base's is kept
        # where a model lacks it, one a model has and the base lacks is left out, as loading would (hp63a c50)
        covered -= {n for n in missing if _RECOMPUTED.search(n)}
        missing = [n for n in missing if not _RECOMPUTED.search(n)]
        extra = [n for n in model.names() if n not in base_set and not _RECOMPUTED.search(n)]
        extra = _untied_copies(base, model, k, extra)  # a tied head stored anyway (writers that keep both names)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} of the base's tensors, first {missing[0]!r}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) the base lacks, first {extra[0]!r}")
            first = (missing or extra)[0]
            hint = "all models must be fine-tunes of the same base architecture"
            # a tensor may sit in a shard the index never names: the index, not the architecture (hp47 c54)
            lacking, role = (model, f"model {k}'s") if missing else (base, "the base's")
            left_out = lacking.shards_left_out() if hasattr(lacking, "shards_left_out") else []
            prefix = _prefix_apart(missing, extra)
            twin = _normalization_twin(missing, extra, names, have)
            if twin is not None:  # 'café.w' and 'café.w' printed alike (hp71a c38): their code points said
                both = [who for who, held in (("the base", names), (f"model {k}", have))
                        if twin[0] in held and twin[1] in held]
                hint = (f"{twin[0]!r} ({code_points(twin[0])}) and {twin[1]!r} ({code_points(twin[1])}) differ only "
                        "in Unicode normalization (a composed é beside e + a combining accent)"
                        + (f", and {both[0]} holds both: two tensors whose names print alike" if both else "")
                        + ": save every model's tensor names in one form (NFC)")
            elif prefix is not None and not left_out:  # hp53 c44: the same model, saved with and without its head's
                hint = (f"every name differs only by the prefix {prefix!r} (a model saved as its bare body, e.g. "
                        "LlamaModel, beside one saved with its head's wrapper, LlamaForCausalLM): load and save both "
                        "through the same class, or rename the tensors of one")
            # an adapter's weights without its adapter_config.json, as a model or as the base
            model_peft = [n for n in extra if _PEFT_FACTOR.search(n)]
            base_peft = [n for n in missing if _PEFT_FACTOR.search(n)]
            if model_peft and len(model_peft) == len(extra):
                hint = (f"model {k}'s tensors are a PEFT LoRA adapter's factors ({model_peft[0]!r}), which are read "
                        "with the adapter_config.json its training wrote (rank, alpha, target modules); put that "
                        "file beside its adapter_model.safetensors and give the folder")
            elif base_peft and len(base_peft) == len(missing):
                hint = (f"the base's tensors are a PEFT LoRA adapter's factors ({base_peft[0]!r}): the base is the "
                        "full model the fine-tunes and adapters were trained from, never an adapter")
            heads = [n for n in missing if n.endswith(_HEAD_SUFFIXES)]
            if heads and len(heads) == len(missing) and not extra and any(n.endswith(_EMBED_SUFFIXES) for n in have):
                # a model that ties its head to its embedding beside a base that stores its own (hp64a c19)
                hint = (f"model {k} stores no {heads[0]!r}: it ties its head to its input embedding, while the base "
                        "stores a head of its own; merge models that tie alike (save model "
                        f"{k} with its head untied, a copy of its embedding, or use a base that ties it too)")
            if left_out:
                hint = (f"{role} folder holds {', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''}, "
                        "which its index (model.safetensors.index.json) never names: the index is incomplete or "
                        "belongs to another download; regenerate it (or fetch the model again) so that weight_map "
                        "names every tensor")
            raise IncompatibleCheckpointsError(
                f"tensor names differ: model {k} ({model.label}) " + " and ".join(parts)
                + f"\n  {first!r} in each input:\n" + _shapes_table(first, base, models),
                hint=hint,
            )
    # -- tied tensors
    tied = []
    for group in _tied_groups(base, names):
        if _same_values([base, *models], group[0], group[1]):
            tied.append(group)
        elif not hasattr(base, "storage_key"):
            _refuse_head_changed_apart(base, models, group)
    alias_of = {n: g[0] for g in tied for n in g[1:]}
    # -- shapes, dtypes, vocabulary policy
    jobs: list[TensorJob] = []
    truncated: list[dict] = []
    changed: list[tuple[str, int]] = []  # (integer tensor, model) where the model holds other values than the base
    as_floats: list[tuple[str, int]] = []  # (integer tensor, model) where the model stores floats
    narrowed: dict[int, list[str]] = {}  # model -> merged tensors it stores as float8 where the base is wider
    for name in names:
        if name in alias_of:
            continue
        info = base.info(name)
        aliases = next((g[1:] for g in tied if g[0] == name), ())
        # an integer (or boolean) base tensor that a model changes as floats: nothing merges there, the base is copied.
        # An adapter of it (hp81a c40: int8; hp84a c17: int16/int32, a LoRA's change dropped silently) says the base
        # is quantized: refused. A buffer a full model stores as floats (its state dict cast whole) is copied, with a
        # warning below, whatever its integer width (hp85a c69: a uint8 one was "a quantized base?"); a base whose
        # layer weights are integers was refused as quantized before (inputs._refuse_quantized)
        if not info.is_floating:
            held = [k for k in range(len(models)) if name in model_names[k]]  # a model may lack a buffer: kept
            adapted = [k for k in held if yields_task_vector(models[k])]
            as_floats.extend((name, k) for k in held if k not in adapted and models[k].info(name).is_floating)
            if adapted:
                raise IncompatibleCheckpointsError(
                    f"tensor {name!r}: the base stores it as {info.dtype_info.name} but model {adapted[0]} changes it "
                    "(an adapter of that layer): the base is not the model the others were fine-tuned from in that "
                    "form (a quantized base?)\n"
                    + _shapes_table(name, base, models),
                    hint="pass the unquantized base (floating weights), as the fine-tunes were trained from it")
        if not info.is_floating or name not in covered:
            jobs.append(TensorJob(name, info.shape, info.dtype_info, merge=False, aliases=aliases))
            if not info.is_floating:
                changed.extend((name, k) for k in _models_changing(base, models, model_names, name))
            continue
        for k, model in enumerate(models):
            if yields_task_vector(model):
                continue  # bind() checked the adapter's shapes against the base
            mi = model.info(name)
            if not mi.is_floating:
                raise IncompatibleCheckpointsError(
                    f"tensor {name!r} must merge but model {k} ({model.location(name)}) stores it as "
                    f"{mi.dtype_info.name}, not a floating dtype\n" + _shapes_table(name, base, models),
                    hint="floating tensors of the base are merged; the model's tensor must be floating too",
                )
            if mi.dtype_info.code.startswith("F8") and not info.dtype_info.code.startswith("F8"):
                narrowed.setdefault(k, []).append(name)
            if mi.shape == info.shape:
                continue
            # only a tensor whose rows are tokens (an embedding, an output head) may differ in rows: another
            # tensor with more rows is another architecture, and cutting it would merge it silently
            rows_only = len(mi.shape) == len(info.shape) >= 1 and mi.shape[1:] == info.shape[1:] \
                and name.endswith(VOCAB_SUFFIXES)
            if rows_only and vocab_policy == "truncate" and mi.shape[0] > info.shape[0]:
                truncated.append({"tensor": name, "model": k, "from_rows": mi.shape[0], "to_rows": info.shape[0]})
                continue
            hint = "all models must share the base's architecture"
            union = (f"{policy_words['union']} keeps every model's added tokens (their rows: the "
                     "mean of the models that have them)") if union_offered else None
            if rows_only and mi.shape[0] < info.shape[0]:  # truncate cuts a model's extra rows; these are missing
                # union merges by token only where the model keeps every token of the base's (the base's extra rows
                # being padding); a model that dropped some of them no policy merges (hp64a c161, c164)
                hint = (f"model {k}'s table has fewer rows ({mi.shape[0]}) than the base's ({info.shape[0]}), so "
                        "truncating cannot help; if its tokenizer keeps every token of the base's (the base's extra "
                        "rows are padding), " + (
                            f"{union}, each token's row from the models that have it" if union else
                            "`tiesmerge merge --vocab-policy union` merges by token") + "; if it dropped some of "
                        "them, no policy can merge it: give the base it was fine-tuned from")
            elif rows_only:
                hint = "the vocabulary sizes differ; " + (f"{union}, " if union else "") + (
                    f"{policy_words['truncate']} keeps only the base's first rows of every model, if the added "
                    "tokens come after the base's")
            raise IncompatibleCheckpointsError(
                f"tensor {name!r}: shapes differ between the base and model {k}\n" + _shapes_table(name, base, models),
                hint=hint,
            )
        # a tensor of no entries (a 0 among its dimensions, however large the others) is the same in every input:
        # copied, never planned or merged (shape (0, 2**62) broke the fused path, tsv_m asked 12 TiB: hp29 F5, N9)
        jobs.append(TensorJob(name, info.shape, info.dtype_info, merge=0 not in info.shape, aliases=aliases))
    if changed and any(j.merge for j in jobs):  # copied from the base: a model's own values there (position ids,
        # a mask) are not in the output; where nothing merges at all, the warning below says the output is the base
        tensors = list(dict.fromkeys(n for n, _ in changed))
        warnings.warn(f"{len(tensors)} integer or boolean tensor(s) are copied from the base, but model(s) "
                      f"{', '.join(str(k) for k in sorted({k for _, k in changed}))} hold other values there "
                      f"({', '.join(repr(n) for n in tensors[:5])}{', ...' if len(tensors) > 5 else ''}): such "
                      "tensors are not merged, so the output keeps the base's values", MergeWarning, stacklevel=2)
    for k, names in narrowed.items():  # a float8 copy of a fine-tune (no scales): θ − θ_base is mostly float8's own
        # rounding of the weights (3 mantissa bits), not the fine-tune's change (hp87a c95: 2.8 times its norm,
        # cosine 0.19), merged without a word
        code = models[k].info(names[0]).dtype_info.name
        warnings.warn(f"model {k} stores {len(names)} merged tensor(s) as {code} ({', '.join(map(repr, names[:3]))}"
                      f"{', ...' if len(names) > 3 else ''}) where the base is wider: its task vector (its weights "
                      "minus the base's) is then mostly float8's rounding of the weights, not its fine-tuning; merge "
                      "the model as it was trained (its float16/bfloat16/float32 weights)", MergeWarning, stacklevel=2)
    if as_floats:
        tensors = list(dict.fromkeys(n for n, _ in as_floats))
        warnings.warn(f"{len(tensors)} integer or boolean tensor(s) of the base ("
                      f"{', '.join(repr(n) for n in tensors[:5])}{', ...' if len(tensors) > 5 else ''}) are stored "
                      f"as floats by model(s) {', '.join(str(k) for k in sorted({k for _, k in as_floats}))}: such "
                      "tensors are not merged, so the output keeps the base's values there, whatever the models hold",
                      MergeWarning, stacklevel=2)
    if not any(j.merge for j in jobs):  # integer tensors only: the output is the base, whatever the models hold
        integers = sum(1 for j in jobs if not j.dtype_info.is_floating)
        empty = sum(1 for j in jobs if 0 in j.shape and j.dtype_info.is_floating)  # copied too (hp30 N1)
        # floating tensors no adapter changes (hp84a c17: one was counted among "integers or booleans")
        unchanged = len(jobs) - integers - empty
        kinds = [("integers or booleans (buffers, quantized weights)", integers), ("tensors of no entries", empty),
                 ("tensors no model changes", unchanged)]
        what = [f"{kind}{f' ({n})' if n != len(jobs) or kind != kinds[0][0] else ''}" for kind, n in kinds if n]
        warnings.warn(f"nothing to merge: the base's {len(jobs)} tensor(s) are {', or '.join(what)}, which are "
                      "copied from the base; the output is the base", MergeWarning, stacklevel=2)
    return Alignment(tuple(jobs), tuple(tied), tuple(truncated))

