"""Tokenizers read as data, and the union of the vocabularies of a base and its fine-tunes.

A tokenizer is read from the model's own directory with the limited JSON reader (no code runs,
no ``trust_remote_code``): ``tokenizer.json`` (its model vocabulary and ``added_tokens``), else
``vocab.txt`` / ``vocab.json`` with ``added_tokens.json`` and ``tokenizer_config.json``'s
``added_tokens_decoder``. Every file goes through :func:`tiesmerge.paths.inside`.

The union (``--vocab-policy union``):

* the base's ids ``0 .. V_b-1`` stay; every model must mean the same string at each of them,
  else the error names the id, both strings and both inputs;
* the tokens a model adds (its ids ``>= V_b``) are appended after the base's, model by model
  in the order the models are given, each model's in its own id order; a string that several
  models added gets one id (the first model's entry: special flag, strip options; other options in a later
  model are warned of);
* a model's tokenizer that grew its *base vocabulary* (new entries of the BPE/WordPiece model
  itself, not added tokens) is refused: added tokens can carry them only as whole strings.

The output's tokenizer files are the base's with the new tokens added (``tokenizer.json``'s
``added_tokens``, ``tokenizer_config.json``'s ``added_tokens_decoder`` and
``additional_special_tokens``, ``special_tokens_map.json``, ``added_tokens.json``), and
``config.json``'s ``vocab_size`` follows the merged embedding. The chat template is the
base's; where the base has none, the first model's that has one (recorded in the manifest).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, IncompatibleCheckpointsError, TiesMergeError
from ..limits import MAX_CONFIG_BYTES, loads_json, read_json
from ..paths import inside, read_regular

__all__ = ["TokenizerVocab", "NewToken", "VocabUnion", "read_vocab", "union_of", "write_tokenizer_files"]

_ENTRY_KEYS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(frozen=True)
class TokenizerVocab:
    """One model's tokenizer as data: id -> string, and the added-token entries by id."""

    label: str
    directory: Path
    tokens: dict[int, str]
    added: dict[int, dict[str, Any]]  # id -> {"content", "special", "lstrip", ...} as tokenizer.json writes it
    model_ids: frozenset[int]  # ids of the tokenizer model's own vocabulary (not added tokens)
    source: str  # the file(s) read

    @property
    def size(self) -> int:
        return max(self.tokens, default=-1) + 1



def align_words() -> str:
    """How the running command spells the union policy: --vocab-policy union, or a mergekit recipe's tokenizer_source
    (hp46 c32b: a flag refused over mergekit recipes was named)."""
    from .align import policy_words

    return policy_words["union"].split(" (")[0]

def _file(directory: Path, name: str, label: str) -> Path | None:
    path = directory / name
    if not os.path.lexists(path):
        return None
    return inside(path, directory, f"{label}'s {name}")


def _entry(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("content"), str):
        raise CheckpointError(f"{where}: an added token is not an object with a 'content' string ({str(raw)[:80]})",
                              hint="the tokenizer file is damaged; save the tokenizer again")
    if not raw["content"]:  # no text can produce it, and the union would give it a row of its own
        raise CheckpointError(f"{where}: an added token (id {raw.get('id', '?')}) has empty content",
                              hint="the tokenizer file is damaged; remove that token or save the tokenizer again")
    flags = [k for k in _ENTRY_KEYS[1:] if k in raw and not isinstance(raw[k], bool)]
    if flags:  # the output's tokenizer.json would hold them, and no tokenizer would load it (the Rust one refuses)
        raise CheckpointError(f"{where}: the added token {raw['content'][:80]!r} has {flags[0]} = "
                              f"{str(raw[flags[0]])[:40]!r}, not true or false",
                              hint="the tokenizer file is damaged; save the tokenizer again (tokenizers writes "
                                   "booleans)")
    entry = {k: raw[k] for k in _ENTRY_KEYS if k in raw}
    entry.setdefault("special", False)
    # the flags tokenizers requires in every added token, where the model's file left them out
    for flag in ("single_word", "lstrip", "rstrip"):
        entry.setdefault(flag, False)
    entry.setdefault("normalized", not entry["special"])
    return entry


MAX_TOKEN_ID = 1 << 31  # no vocabulary comes near (the largest have a few hundred thousand tokens)


def _as_id(value: Any, where: str, *, key: bool = False) -> int:
    """A token id: an integer, or (``key``: a JSON object's key, which is always a string) the text of one; 1.5,
    "1e3", or "65" where JSON holds numbers is none (tokenizers refuses a string id: "expected u32")."""
    try:
        out = int(value) if isinstance(value, int) or (key and isinstance(value, str)) else -1
    except (TypeError, ValueError):
        out = -1
    if isinstance(value, bool) or not 0 <= out < MAX_TOKEN_ID:
        raise CheckpointError(f"{where}: token id {str(value)[:40]!r} is not an integer from 0 to {MAX_TOKEN_ID - 1:,}"
                              + (" (a string, where the file holds numbers)" if isinstance(value, str) else ""),
                              hint="the tokenizer file is damaged; save the tokenizer again")
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def _put(tokens: dict[int, str], i: int, text: str, where: str) -> None:
    if _SURROGATE.search(text):  # valid JSON ("\ud800"), but no UTF-8 text: writing the union's tokenizer failed
        # after the whole merge, "a bug" (hp64a c108)
        raise CheckpointError(f"{where}: token id {i} is {text[:40]!r}, which holds a lone UTF-16 surrogate: no "
                              "tokenizer can encode it as UTF-8", hint="the tokenizer file is damaged (an escape "
                              "\\ud800 without its pair); save the tokenizer again")
    if tokens.get(i, text) != text:
        raise CheckpointError(f"{where}: id {i} is both {tokens[i]!r} and {text!r} in this tokenizer",
                              hint="the tokenizer files disagree with each other; save the tokenizer again")
    tokens[i] = text


def special_list(value: Any, where: str) -> list[Any]:
    """A tokenizer file's ``additional_special_tokens`` as the list transformers reads: none, one token (a string, or
    an AddedToken's mapping with its ``content``), or a list of them; anything else is a typed error naming the file
    (``list("<s>")`` would have written the characters as three tokens)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(e, str) or (isinstance(e, dict) and isinstance(e.get("content"), str)) for e in items):
        raise CheckpointError(f"{where}: additional_special_tokens is {type(value).__name__} {str(value)[:60]}, not "
                              "a token or a list of tokens (strings, or mappings with a 'content')",
                              hint="the tokenizer files are damaged: save the tokenizer again")
    return list(items)


def with_other_files(directory: Path, label: str, exc: CheckpointError) -> TiesMergeError:
    """``exc`` (a tokenizer file of ``directory`` refused) with every other refused file of the folder named too
    (hp65a c58: four files linked out of one model were refused one per run), as the merge's own check of the
    folder's files names them; ``exc`` itself where that check finds nothing else."""
    from ..paths import model_dir_files

    try:
        model_dir_files(directory, label)
    except TiesMergeError as every:
        if exc.message.splitlines()[0] in every.message and "\nalso: " in every.message:
            return every
    return exc


def read_vocab(directory: str | os.PathLike, label: str) -> TokenizerVocab:
    """The tokenizer of a model directory, read as data (see the module's docstring); a refused file is said with
    every other refused file of the folder."""
    try:
        return _read_vocab(Path(directory), label)
    except CheckpointError as exc:
        raise with_other_files(Path(directory), label, exc) from None


def _read_vocab(directory: Path, label: str) -> TokenizerVocab:
    """The tokenizer of a model directory, read as data (see the module's docstring)."""
    directory = Path(directory)
    tokens: dict[int, str] = {}
    added: dict[int, dict[str, Any]] = {}
    read: list[str] = []
    model_ids: set[int] = set()
    tj = _file(directory, "tokenizer.json", label)
    if tj is not None:
        data = read_json(tj, f"{label}'s tokenizer.json")
        model = data.get("model") if isinstance(data, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: string -> id
            for text, i in vocab.items():
                _put(tokens, _as_id(i, str(tj)), str(text), str(tj))
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
            for i, item in enumerate(vocab):
                text = item[0] if isinstance(item, list) and item else item
                _put(tokens, i, str(text), str(tj))
        else:
            raise CheckpointError(f"{tj}: no model vocabulary (model.vocab) in this tokenizer.json",
                                  hint="save the tokenizer with a fast (tokenizers) backend")
        model_ids = set(tokens)
        if not isinstance(data.get("added_tokens") or [], list):  # the writer extends the base's list too
            raise CheckpointError(f"{tj}: added_tokens is {type(data['added_tokens']).__name__}, not a list of "
                                  "tokens", hint="the tokenizer file is damaged: save the tokenizer again")
        for raw in data.get("added_tokens") or []:
            entry = _entry(raw, str(tj))
            i = _as_id(raw.get("id"), str(tj))
            _put(tokens, i, entry["content"], str(tj))
            added[i] = entry
        read.append("tokenizer.json")
    else:
        for name in ("vocab.txt", "vocab.json"):
            path = _file(directory, name, label)
            if path is None:
                continue
            raw = read_regular(path, f"{label}'s {name}", max_bytes=MAX_CONFIG_BYTES)
            if name == "vocab.txt":
                try:
                    lines = raw.decode("utf-8").split("\n")
                except UnicodeDecodeError as exc:
                    raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason})") from None
                if lines and lines[-1] == "":
                    lines.pop()
                for i, text in enumerate(lines):
                    _put(tokens, i, text.rstrip("\r"), str(path))
            else:
                vocab = loads_json(raw, str(path))
                if not isinstance(vocab, dict):
                    raise CheckpointError(f"{path}: not a mapping of tokens to ids")
                for text, i in vocab.items():
                    _put(tokens, _as_id(i, str(path)), str(text), str(path))
            model_ids = set(tokens)
            read.append(name)
            break
        at = _file(directory, "added_tokens.json", label)
        if at is not None:
            data = read_json(at, f"{label}'s added_tokens.json")
            if not isinstance(data, dict):
                raise CheckpointError(f"{at}: not a mapping of tokens to ids")
            for text, i in data.items():
                _entry({"content": text, "id": i}, str(at))  # an empty token is refused, as in tokenizer.json
                i = _as_id(i, str(at))
                _put(tokens, i, str(text), str(at))
                added.setdefault(i, {"content": str(text), "special": False})
            read.append("added_tokens.json")
    tc = _file(directory, "tokenizer_config.json", label)
    if tc is not None and read:
        data = read_json(tc, f"{label}'s tokenizer_config.json")
        decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
        if isinstance(data, dict):  # checked now: the output's is the base's, extended after the merge
            special_list(data.get("additional_special_tokens"), str(tc))
        if decoder is not None and not isinstance(decoder, dict):  # the writer adds the new tokens to the base's
            raise CheckpointError(f"{tc}: added_tokens_decoder is {type(decoder).__name__}, not a mapping of token "
                                  "ids to tokens", hint="the tokenizer config is damaged: save the tokenizer again")
        if isinstance(decoder, dict):
            for key, raw in decoder.items():
                i = _as_id(key, str(tc), key=True)
                entry = _entry(raw, str(tc))
                _put(tokens, i, entry["content"], str(tc))
                added[i] = {**added.get(i, {}), **entry}
            read.append("tokenizer_config.json")
    stm = _file(directory, "special_tokens_map.json", label)
    if stm is not None and read:  # extended in the output (the base's): its list checked before the merge
        data = read_json(stm, f"{label}'s special_tokens_map.json")
        if isinstance(data, dict):
            special_list(data.get("additional_special_tokens"), str(stm))
    if not read:
        # the folder said once where the label is its name (hp47 c58: "hfbase: hfbase has no tokenizer")
        who = f"{directory}" if label in (str(directory), Path(directory).name) else f"{directory}: {label}"
        raise CheckpointError(
            f"{who} has no tokenizer tiesmerge can read as data (looked for tokenizer.json, vocab.txt, "
            f"vocab.json); {align_words()} needs every model's tokenizer",
            hint="save the tokenizer beside the weights (tokenizer.save_pretrained(DIR)); a sentencepiece-only "
                 "tokenizer.model is not read: save it with a fast tokenizer to get tokenizer.json")
    _check_added_once(tokens, added, directory, label)
    return TokenizerVocab(label, directory, tokens, added, frozenset(model_ids), "+".join(read))


def _check_added_once(tokens: dict[int, str], added: dict[int, dict[str, Any]], directory: Path, label: str) -> None:
    """An added token's text at a second id: the text encodes to one of them, so the union could keep only one row
    and would drop the other's trained embedding silently."""
    ids: dict[str, int] = {}
    for i, text in tokens.items():
        first = ids.setdefault(text, i)
        if first != i and (i in added or first in added):
            raise CheckpointError(
                f"{directory}: {label}'s tokenizer gives the added token {text!r} two ids, {min(first, i)} and "
                f"{max(first, i)}: text can reach only one of them, so merging vocabularies would drop the other's row",
                hint="remove the duplicate from the tokenizer (added_tokens / added_tokens_decoder) and save it again")


@dataclass(frozen=True)
class NewToken:
    """A token that some models added: its id in the union and where each model holds it."""

    id: int
    content: str
    entry: dict[str, Any]
    sources: tuple[tuple[int, int], ...]  # (model index, the model's id of it)


@dataclass(frozen=True)
class VocabUnion:
    base: TokenizerVocab
    models: tuple[TokenizerVocab, ...]
    new: tuple[NewToken, ...]
    maps: tuple[dict[int, int], ...]  # per model: its id -> the union's, for its ids >= the base's size
    chat_template_from: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def base_size(self) -> int:
        return self.base.size

    @property
    def size(self) -> int:
        return self.base_size + len(self.new)

    def manifest(self) -> dict[str, Any]:
        return {"base_tokens": self.base_size, "tokens": self.size,
                "new_tokens": [{"id": t.id, "content": t.content, "special": bool(t.entry.get("special")),
                                "from_models": [k for k, _ in t.sources]} for t in self.new],
                "id_maps": [{"model": k, "label": m.label, "unchanged_below": self.base_size,
                             "moved": [[a, b] for a, b in sorted(self.maps[k].items()) if a != b]}
                            for k, m in enumerate(self.models)],
                "chat_template_from": self.chat_template_from, "notes": list(self.notes)}


_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


def check_same_tokens(base: tuple[Path, str], models: list[tuple[int, Path, str]], rows: int | None = None) -> None:
    """Without ``--vocab-policy union``, row i of every embedding is merged with row i: the same token
    only when every tokenizer gives id i the same string. When the base and a model both hold a
    tokenizer (read as data), the ids they share must agree; a swap of two ids (another tokenizer of the
    same size) would otherwise merge silently into nonsense. A tokenizer not readable as data is
    skipped: this check only refuses what it can see."""
    def vocab(directory: Path, label: str) -> TokenizerVocab | None:
        present = [n for n in _VOCAB_FILES if os.path.lexists(directory / n)]
        if not present:
            return None
        try:
            for name in present:  # a link leaving the model or a FIFO is refused, not skipped as "unreadable": a
                # swapped tokenizer behind a link merged silently (hp64a c101, c105)
                real = inside(directory / name, directory, f"{label}'s {name}")
                if not real.is_file():
                    raise CheckpointError(f"{directory / name}: {label}'s {name} is not a regular file",
                                          hint="replace it by the tokenizer file itself")
        except CheckpointError as exc:
            raise with_other_files(directory, label, exc) from None
        try:
            return read_vocab(directory, label)
        except CheckpointError:
            return None

    vb = vocab(*base)
    if vb is None:
        return
    if rows is not None and vb.size > rows:  # the output takes the base's tokenizer: ids past its rows crash a model
        import warnings  # (hp64a c173: said nowhere)

        from ..errors import MergeWarning

        warnings.warn(MergeWarning(
            f"{base[1]}: the base's tokenizer holds {vb.size:,} tokens, but its token tables have {rows:,} rows: ids "
            f"{rows:,} and up have no row, in the base and in the merged model, which takes its tokenizer (is it "
            "another model's tokenizer?)"), stacklevel=4)
    beyond: dict[int, tuple[int, str, str]] = {}  # an id the base leaves unused -> (model, its token, its label)
    for k, directory, label in models:  # k: the model's position among all the models
        vm = vocab(directory, label)
        if vm is None:
            continue
        for i, text in sorted(vm.tokens.items()):  # the base's padding rows (ids below its embedding's ``rows``),
            if i in vb.tokens or rows is None or i >= rows:  # filled by the models' added tokens: the same row must be
                continue  # the same token in each (hp64a c72, c74: two tokens' rows mixed); rows past it are cut
            first = beyond.setdefault(i, (k, text, label))
            if first[1] != text:
                raise IncompatibleCheckpointsError(
                    f"id {i}, a row the base's tokenizer leaves unused (padding), is {first[1]!r} in model {first[0]} "
                    f"({first[2]}) but {text!r} in model {k} ({label}): merging row by row would mix the two tokens' "
                    "embeddings", hint="--vocab-policy union merges the models' added tokens by token, each in a "
                                       "row of its own")
        differ = [i for i in sorted(vb.tokens) if i in vm.tokens and vm.tokens[i] != vb.tokens[i]]
        if differ:
            shown = ", ".join(f"id {i}: {vb.tokens[i]!r} in the base, {vm.tokens[i]!r} in model {k}"
                              for i in differ[:3])
            raise IncompatibleCheckpointsError(
                f"model {k} ({label}) has another tokenizer than the base ({base[1]}): {shown}"
                f"{f' ({len(differ)} ids differ)' if len(differ) > 3 else ''}; merging row by row would mix "
                "different tokens' embeddings",
                hint=f"merge models fine-tuned from this base with its tokenizer; {align_words()} handles tokens "
                     "a model added after the base's, but ids the models give other strings mean another tokenizer")


def _who(v: TokenizerVocab, k: int | None) -> str:
    return f"the base ({v.label})" if k is None else f"model {k} ({v.label})"


def union_of(base: TokenizerVocab, models: list[TokenizerVocab]) -> VocabUnion:
    """The union vocabulary (see the module's docstring), or a typed error naming the id, the
    strings and the inputs that disagree."""
    vb = base.size
    by_text = {t: i for i, t in base.tokens.items()}
    for k, m in enumerate(models):
        for i in range(vb):
            mine, theirs = base.tokens.get(i), m.tokens.get(i)
            if mine == theirs:
                continue
            if theirs is None:
                own = i in base.added and i not in base.model_ids  # a token the base itself added: a fine-tune (a
                # base-less mergekit recipe's first model: hp69a c24, where union was hinted and failed)
                raise IncompatibleCheckpointsError(
                    f"token id {i} ({mine!r} in {_who(base, None)}) is missing from model {k}'s tokenizer "
                    f"({m.label}: {m.size} tokens)",
                    hint=(f"{mine!r} is a token the base itself added (at id {i}): the base looks like a fine-tune "
                          "of another model; give the model they were all fine-tuned from as the base (base_model: "
                          "in a mergekit recipe, which otherwise merges onto its first model)"
                          if own else "every model must keep the base's tokens at their ids"))
            other = next((j for j, o in enumerate(models) if j != k and o.tokens.get(i) not in (None, theirs)), None)
            if mine is None:
                raise IncompatibleCheckpointsError(
                    f"token id {i} is unused in {_who(base, None)} but model {k} ({m.label}) uses it for {theirs!r}; "
                    f"the union places added tokens only after the base's {vb}",
                    hint="these models do not share the base's tokenizer")
            if other is not None:
                o = models[other]
                raise IncompatibleCheckpointsError(
                    f"token id {i} means {theirs!r} in model {k} ({m.label}) but {o.tokens[i]!r} in model {other} "
                    f"({o.label}); the base ({base.label}) has {mine!r}",
                    hint="the models' tokenizers are not extensions of the base's; merge models that share it")
            hint = ("the model was not fine-tuned with the base's tokenizer (another model family, or a re-trained "
                    "tokenizer); merge models that share it")
            if i in base.added and i not in base.model_ids:  # the base's own added token: the base is a fine-tune
                # (a mergekit recipe without base_model merges onto its first model: hp64a c22, c23, c123)
                hint = (f"{mine!r} is a token the base itself added (at id {i}): the base looks like a fine-tune "
                        "of another model; give the model they were all fine-tuned from as the base (base_model: "
                        "in a mergekit recipe, which otherwise merges onto its first model)")
            raise IncompatibleCheckpointsError(
                f"token id {i} means {mine!r} in the base ({base.label}) but {theirs!r} in model {k} ({m.label})",
                hint=hint)
    new: dict[str, NewToken] = {}
    maps: list[dict[int, int]] = []
    for k, m in enumerate(models):
        grown = sorted(i for i in m.model_ids if i >= vb)
        if grown:
            raise IncompatibleCheckpointsError(
                f"model {k} ({m.label}) grew its tokenizer's own vocabulary: {len(grown)} entries at ids >= {vb}, "
                f"first id {grown[0]} = {m.tokens[grown[0]]!r}, are in its {m.source} model vocabulary, not added "
                "tokens", hint="the union merges added tokens (special, chat or tool tokens); a re-trained or "
                               "extended BPE/WordPiece vocabulary cannot be carried as whole-string tokens")
        mapping: dict[int, int] = {}
        for i in sorted(j for j in m.tokens if j >= vb):
            text = m.tokens[i]
            if text in by_text:
                raise IncompatibleCheckpointsError(
                    f"model {k} ({m.label}) adds {text!r} at id {i}, but the base already has it at id "
                    f"{by_text[text]}", hint="a model's tokenizer must not hold one string at two ids")
            token = new.get(text)
            entry = m.added.get(i, {"content": text, "special": False})
            if token is None:
                token = new[text] = NewToken(vb + len(new), text, entry, ())
            else:
                _warn_other_options(token, entry, k)
            new[text] = NewToken(token.id, text, token.entry, (*token.sources, (k, i)))
            mapping[i] = new[text].id
        maps.append(mapping)
    return VocabUnion(base, tuple(models), tuple(new.values()), tuple(maps))


def _warn_other_options(token: NewToken, entry: dict[str, Any], k: int) -> None:
    """A token added again by model ``k`` with other options (its special flag, strip options) than the first
    model's entry, which the union keeps: said, since a special token is neither split nor decoded as a plain one
    (hp64a c07: a chat token special in one model and plain in another took the first's silently)."""
    def flags(e: dict[str, Any]) -> dict[str, bool]:  # the defaults _entry gives a file's missing keys
        special = bool(e.get("special", False))
        return {key: bool(e.get(key, not special if key == "normalized" else False)) for key in _ENTRY_KEYS[1:]}

    mine, kept = flags(entry), flags(token.entry)
    differ = [key for key in mine if mine[key] != kept[key]]
    if differ:
        import warnings

        from ..errors import MergeWarning

        first = token.sources[0][0]
        said = ", ".join(f"{key} {kept[key]} in model {first}, {mine[key]} in model {k}" for key in differ)
        warnings.warn(MergeWarning(f"the added token {token.content!r} has other options in model {k} than in model "
                                   f"{first} ({said}): the union keeps model {first}'s"), stacklevel=3)


# ------------------------------------------------------------------ the output's tokenizer files


def _read_obj(directory: Path, name: str, label: str) -> dict[str, Any] | None:
    path = _file(directory, name, label)
    if path is None:
        return None
    data = read_json(path, f"{label}'s {name}")
    return data if isinstance(data, dict) else None


def _chat_template(directory: Path, label: str) -> tuple[str | None, str | None]:
    """(the tokenizer_config key, chat_template.jinja's text) of a model, either may be None."""
    config = _read_obj(directory, "tokenizer_config.json", label) or {}
    key = config.get("chat_template") if isinstance(config.get("chat_template"), (str, list)) else None
    path = _file(directory, "chat_template.jinja", label)
    text = read_regular(path, f"{label}'s chat_template.jinja", max_bytes=MAX_CONFIG_BYTES).decode(
        "utf-8", "replace") if path is not None else None
    return key, text


def _specials(union: VocabUnion) -> list[str]:
    return [t.content for t in union.new if t.entry.get("special")]


def write_tokenizer_files(union: VocabUnion, target: Path, vocab_rows: int) -> tuple[list[str], str | None]:
    """Write the merged tokenizer into ``target`` (which holds the base's copied files) and set
    ``config.json``'s ``vocab_size`` to ``vocab_rows``. Returns the files written and where the
    chat template came from (None: the base's, or none)."""
    base_dir, label = union.base.directory, union.base.label
    written: list[str] = []
    specials = _specials(union)

    def dump(name: str, data: Any) -> None:
        (target / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        written.append(name)

    tj = _read_obj(base_dir, "tokenizer.json", label)
    if tj is not None:
        tj["added_tokens"] = list(tj.get("added_tokens") or []) + [
            {"id": t.id, **{k: t.entry[k] for k in _ENTRY_KEYS if k in t.entry}} for t in union.new]
        dump("tokenizer.json", tj)
    tc = _read_obj(base_dir, "tokenizer_config.json", label)
    chat_from = None
    if tc is not None or tj is None:
        tc = dict(tc or {})
        if not isinstance(tc.get("added_tokens_decoder") or {}, dict):
            raise CheckpointError(f"{label}'s tokenizer_config.json: added_tokens_decoder is not a mapping of token "
                                  "ids to tokens", hint="the tokenizer config is damaged: save the tokenizer again")
        decoder = dict(tc.get("added_tokens_decoder") or {})
        for t in union.new:
            decoder[str(t.id)] = {"content": t.content, "lstrip": bool(t.entry.get("lstrip", False)),
                                  "normalized": bool(t.entry.get("normalized", not t.entry.get("special"))),
                                  "rstrip": bool(t.entry.get("rstrip", False)),
                                  "single_word": bool(t.entry.get("single_word", False)),
                                  "special": bool(t.entry.get("special", False))}
        tc["added_tokens_decoder"] = decoder
        if specials:
            extra = special_list(tc.get("additional_special_tokens"), f"{label}'s tokenizer_config.json")
            names = [e if isinstance(e, str) else e.get("content") for e in extra]
            tc["additional_special_tokens"] = extra + [s for s in specials if s not in names]
        base_key, base_text = _chat_template(base_dir, label)
        if base_key is None and base_text is None:
            for m in union.models:
                key, text = _chat_template(m.directory, m.label)
                if key is not None or text is not None:
                    chat_from = m.label
                    if key is not None:
                        tc["chat_template"] = key
                    if text is not None:
                        (target / "chat_template.jinja").write_text(text)
                        written.append("chat_template.jinja")
                    break
        dump("tokenizer_config.json", tc)
    stm = _read_obj(base_dir, "special_tokens_map.json", label)
    if stm is not None and specials:
        extra = special_list(stm.get("additional_special_tokens"), f"{label}'s special_tokens_map.json")
        names = [e if isinstance(e, str) else e.get("content") for e in extra]
        stm["additional_special_tokens"] = extra + [s for s in specials if s not in names]
        dump("special_tokens_map.json", stm)
    at = _read_obj(base_dir, "added_tokens.json", label)
    if at is not None or tj is None:
        at = dict(at or {})
        at.update({t.content: t.id for t in union.new})
        dump("added_tokens.json", at)
    config = _read_obj(base_dir, "config.json", label)
    if config is not None:
        config["vocab_size"] = vocab_rows
        if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
            config["text_config"]["vocab_size"] = vocab_rows
        if (target / "config.json").exists():
            prev = loads_json((target / "config.json").read_bytes(), str(target / "config.json"))
            for key in ("torch_dtype", "dtype"):  # the output dtype, set when the file was copied
                if isinstance(prev, dict) and key in prev:
                    config[key] = prev[key]
        dump("config.json", config)
    return written, chat_from
