"""Every path a command reads or writes, resolved and checked in one place.

Reading: an input is followed through its links to a regular file or a directory; a loop, a
dangling link, a FIFO, a device or a socket is a typed error before anything is opened (a FIFO
named ``*.safetensors`` would block the reader forever). Files a model names (index shards,
the config and tokenizer files copied into the output) must resolve inside the model's own
directory, so a hostile index or a link cannot make tiesmerge read ``~/.ssh``.

Writing: the output replaces a directory only when that directory was written by tiesmerge
(it holds a ``tiesmerge.json``, a statistics manifest or an analysis report) and is none of
the command's inputs, nor inside one, nor holds one, after links are followed; ``.``, ``~``,
``/`` and the folders above the working directory are never replaced.

>>> check_input("path/to/model", "the base")            # doctest: +SKIP
PosixPath('/abs/path/to/model')
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, OutputError, TiesMergeError
from .sizes import format_size

__all__ = ["fs_text", "undecodable_as_bytes", "demo_workdir", "demo_models_written", "remove_demo_files", "DEMO_MARKER",
           "write_error",           "MODEL_FILES", "MODEL_SUFFIXES", "WEIGHT_SUFFIXES", "TOKENIZER_FILE_NAMES",
           "model_dir_files", "check_model_dir", "CHAT_TEMPLATES_DIR", "OUTPUT_MARKERS", "WRITTEN_FIELD",
           "STAMPS_FIELD", "listing",
           "file_stamp", "stamp_holds", "unlisted_files", "changed_files", "nested", "held_through_mount", "resolve",
           "check_input",
           "open_regular",
           "read_regular", "inside",
           "FileStamps", "umask", "as_if_created", "check_walkable", "identity", "identities",
           "check_output_location", "check_not_input",
           "check_output_file",
           "write_file",
           "check_search_dir"]

# a directory holding one of these (as a regular file) was written by tiesmerge: merge, stats, analyze
OUTPUT_MARKERS = ("tiesmerge.json", "tiesmerge_stats.json", "analysis.json")
OUTPUT_KINDS = {"tiesmerge.json": "a merged model: merge, adapt, tune or search", "tiesmerge_stats.json":
                "statistics: tiesmerge stats", "analysis.json": "an analysis report: tiesmerge analyze"}

# the fields each marker's writer always writes: a file merely named like a marker (``{}``) is no proof
_MARKER_FIELDS = {"tiesmerge.json": ("tiesmerge_version", "output", "inputs", "method"),
                  "tiesmerge_stats.json": ("kind", "examples", "tiesmerge_version"),
                  "analysis.json": ("tiesmerge_version", "n_models")}
_MARKER_MAX_BYTES = 256 << 20  # a manifest lists files and thresholds: far below this

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}  # (a folder at DIR/log.jsonl was "not a regular
# file, not a regular file": hp85b c51)


def undecodable_as_bytes(text: str) -> str:
    """``text`` with each byte of a path that was no UTF-8 (Python's '\\udce9' for the byte e9) written as
    ``\\xe9``, and any other lone surrogate as its ``\\uXXXX`` escape: text a person reads (a card, a message).
    The manifest and a card's recipe keep the surrogate itself, which reads back as the same file name."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else
                   f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text)


def fs_text(value: Any) -> Any:
    """A path given as bytes, or as an ``os.PathLike`` whose ``__fspath__`` returns bytes (how Python hands over a
    name that is no UTF-8), as the ``str`` Python's own file functions use for it (``os.fsdecode``: undecodable
    bytes as surrogates, encoded back unchanged); every other value as given. Bytes paths were bare TypeErrors in
    plan_merge, open_checkpoint and analyze (hp37b A30)."""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, os.PathLike):
        try:
            path = os.fspath(value)
        except Exception as exc:  # noqa: BLE001 - the caller's own __fspath__ failed: said, typed
            from .errors import ConfigError

            raise ConfigError(f"a path given as {type(value).__name__}: its __fspath__ raised {type(exc).__name__}: "
                              f"{str(exc)[:200]}", hint="pass a str or pathlib.Path") from exc
        return os.fsdecode(path) if isinstance(path, bytes) else value
    return value


def _loops(path: str | os.PathLike) -> bool:
    """Whether the links from ``path`` loop (ELOOP) rather than end at nothing."""
    import errno

    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "another kind of file")


def _dangling_target(path: str | os.PathLike) -> str:
    """Where the links from ``path`` end (the first target that is not a link): ``/dev/stdin`` of a pipe is a link
    to ``/proc/self/fd/0``, itself a "link" to ``pipe:[N]``; "a path" where ``path`` is no link."""
    current, target = os.fspath(path), "a path"
    for _ in range(40):  # the kernel's own limit on links followed
        try:
            if not os.path.islink(current):
                break
            target = os.readlink(current)
        except (OSError, ValueError):
            break
        current = os.path.join(os.path.dirname(current), target)
    return target


def look_alike_hint(path: str | os.PathLike, *, new_leaf: bool = False) -> str | None:
    """A hint where a component of ``path`` is missing but its folder holds a name that prints alike: apart only in
    Unicode normalization (a folder macOS named with e + a combining accent, typed with the composed é: hp73a c76,
    "no such file" of a name ``ls`` prints alike), or in invisible characters, spaces at an end, a no-break space or
    a look-alike letter of another script (hp77a c31, c32); None otherwise. ``new_leaf``: the path's last name is
    one to be created (an output), so typing it as stored would name the existing look-alike, not a new one (hp78a
    c38: -o 'bаse' with a Cyrillic а was told to type 'base', the merge's input)."""
    from .unicode_names import code_points, look_alike_twin, normalization_twin

    text = os.fspath(path)
    if not isinstance(text, str) or (text.isascii() and all(p == p.strip() for p in Path(text).parts)):
        return None
    parts = Path(text).parts
    absolute = bool(parts) and bool(Path(parts[0]).anchor)
    current = Path(parts[0]) if absolute else Path()
    walked = parts[1:] if absolute else parts
    for at, part in enumerate(walked):
        candidate = current / part
        if not os.path.lexists(candidate):
            try:
                names = os.listdir(current)[:100_000]
            except OSError:
                return None
            other = look_alike_twin(part, names)
            if other is None:
                return None
            remedy = ("choose a name for the output that prints unlike every name there" if new_leaf and
                      at == len(walked) - 1 else "type the path as it is stored (tab completion does), or rename it")
            if normalization_twin(part, [other]) is not None:
                return (f"{current / other} exists: its name differs from the {part!r} typed only in Unicode "
                        f"normalization ({code_points(other)} there, {code_points(part)} typed; a composed character "
                        f"beside a letter + a combining mark, as macOS writes names): {remedy}")
            return (f"{current / other} exists: its name prints like the {part!r} typed but differs in invisible "
                    f"characters, spaces or letters of another script ({code_points(other)} there, "
                    f"{code_points(part)} typed): {remedy}")
        current = candidate
    return None


def resolve(path: str | os.PathLike, what: str, error: type[TiesMergeError] = CheckpointError) -> Path:
    """``path`` with every link followed (it must exist): typed errors for loops and dangling links."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except ValueError:  # an embedded NUL byte: no file system takes one
        raise error(f"{os.fspath(path)!r}: the path of {what} holds a NUL byte", hint="fix the path") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: pathlib's own loop detection
        code = getattr(exc, "errno", None)
        if code == errno.ELOOP or isinstance(exc, RuntimeError):
            raise error(f"{path}: {what} is a symbolic link loop", hint="fix or remove the link") from None
        if code == errno.ENOENT and os.path.lexists(path):
            target = _dangling_target(path)
            if re.fullmatch(r"(pipe|socket|anon_inode):.*", target):  # /proc/self/fd/N of a pipe: no path at all
                raise error(f"{path}: {what} is a {target.split(':')[0].replace('_', ' ')} ({target}), not a file",
                            hint=f"give {what} as a file path (tiesmerge reads regular files only)") from None
            raise error(f"{path}: {what} is a link to {target}, which does not exist",
                        hint="fix or remove the dangling link") from None
        if code in (errno.ENOENT, errno.ENOTDIR):  # a newline in the name on one line (hp49 c61)
            twin = look_alike_hint(path)
            raise error(f"{str(path).replace(chr(10), chr(92) + 'n')}: no such file or directory (cannot read {what})",
                        hint=twin or f"check the path of {what}") from None
        if code == errno.ENAMETOOLONG:
            raise error(f"{path}: cannot read {what} ({exc.strerror or exc})",
                        hint=f"check the path of {what}: a path holds at most {os.pathconf('/', 'PC_PATH_MAX')} bytes, "
                             f"each name in it at most {os.pathconf('/', 'PC_NAME_MAX')}") from None
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def check_input(path: str | os.PathLike, what: str, error: type[TiesMergeError] = CheckpointError, *,
                hint: str = "pass a model directory or a .safetensors file") -> Path:
    """An input that exists and is, after its links, a regular file or a directory. Returns it resolved. ``hint``:
    what to give instead (a model's, unless the input is another kind: hp86a c39, statistics hinted as a model)."""
    real = resolve(path, what, error)
    mode = os.stat(real).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise error(f"{path}: {what} is {_kind(mode)}, not a file or a directory", hint=hint)
    return real


def open_regular(path: str | os.PathLike, what: str, error: type[TiesMergeError] = CheckpointError) -> int:
    """A read-only descriptor of a regular file. A FIFO or device is refused without blocking:
    it is opened non-blocking and checked with fstat before anything is read."""
    resolve(path, what, error)  # loops and dangling links, named as such
    real = os.path.realpath(path)
    if real.startswith(("/proc/", "/sys/")):  # "regular" files of the kernel: reads block (kmsg) or fail (mem)
        raise error(f"{path}: {what} is a file of the kernel's {real.split('/')[1]} file system ({real}), not a "
                    "file of data", hint="tiesmerge reads only regular files")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot open {what} ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: {what} is {_kind(mode) if not stat.S_ISDIR(mode) else 'a directory'}, "
                    "not a regular file", hint="tiesmerge reads only regular files")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: str | os.PathLike, what: str, *, max_bytes: int,
                 error: type[TiesMergeError] = CheckpointError) -> bytes:
    """A regular file's bytes, refused (unread) when larger than ``max_bytes``."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            from .sizes import format_size

            raise error(f"{path}: {what} is {format_size(size)}, more than the {format_size(max_bytes)} such a file "
                        "can sensibly hold; refusing to read it", hint="check that this is the file you meant")
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:  # a buffer of the file's size, not of the bound: reading
                return f.read(min(size, max_bytes) + 1)[:max_bytes]  # 66 bytes took 4 GiB of address (hp33 C103)
        except OSError as exc:  # EIO from a failing disk: the file's, not standard output's
            raise error(f"{path}: cannot read {what} ({exc.strerror or exc})",
                        hint="check the disk or the file system it is on") from None
    finally:
        os.close(fd)


def physical(path: str | os.PathLike) -> Path:
    """``path`` made absolute the way the kernel resolves it: its folder with links and ".." followed
    (``realpath``), its last name kept as given (a link there is seen, not followed). Lexical
    ``abspath`` is wrong after a link: with ``l -> a/b``, ``l/../x`` is ``a/x`` to the kernel but
    ``./x`` to ``abspath``, and an output checked at one and written at the other replaced an input."""
    text = os.fspath(path)
    head, tail = os.path.split(text.rstrip(os.sep) or text)
    if tail in ("", ".", ".."):  # "-o ." or "-o out/..": the folder itself
        return Path(os.path.realpath(text))
    return Path(os.path.realpath(head or os.curdir)) / tail


def _blobs(root: str | os.PathLike) -> tuple[Path | None, str | None]:
    """For a snapshot of the Hugging Face cache (``models--org--name/snapshots/<revision>``, whose
    files are links into ``models--org--name/blobs``): that repository's blobs folder, resolved, when
    ``<repo>/blobs`` itself (unresolved) is a real directory; else why it is not allowed."""
    plain = physical(root)
    # huggingface_hub's layout only: <cache>/(models|datasets|spaces)--<org>--<name>/snapshots/<revision>; a user's
    # own proj/snapshots/x beside a proj/blobs folder is no cache, and its links into blobs leave the model
    if plain.parent.name != "snapshots" or not re.fullmatch(r"(models|datasets|spaces)--.+", plain.parent.parent.name):
        return None, None
    blobs = plain.parent.parent / "blobs"
    try:
        mode = os.lstat(blobs).st_mode
    except OSError:
        return None, None
    if stat.S_ISLNK(mode):
        return None, f"its cache folder {blobs} is a symbolic link (to {os.readlink(blobs)}), which is refused"
    if not stat.S_ISDIR(mode):
        return None, None
    return Path(os.path.realpath(blobs)), None


def _roots(root: str | os.PathLike) -> list[Path]:
    """Where a model directory's files may live: the directory itself and, for a snapshot of the
    Hugging Face cache, that repository's blobs folder when it is a real directory (not a link)."""
    roots = [Path(os.path.realpath(root))]
    blobs, _ = _blobs(root)
    if blobs is not None:
        roots.append(blobs)
    return roots


def inside(path: str | os.PathLike, root: str | os.PathLike, what: str,
           error: type[TiesMergeError] = CheckpointError) -> Path:
    """``path`` resolved, which must lie inside the model directory ``root``: a model's files never
    reach outside it through ``../``, an absolute path or a link (the Hugging Face cache's own
    links into its blobs folder excepted, when that folder is a real directory, not a link)."""
    real = resolve(path, what, error)
    roots = _roots(root)
    if not any(real == top or top in real.parents for top in roots):
        blobs, why = _blobs(root)
        if why is not None:
            raise error(f"{path}: {what} resolves to {real}, outside {root}; {why}",
                        hint="a Hugging Face cache's blobs folder must be a real directory inside the repository")
        if blobs is not None:  # a cache snapshot's files may lie in its repository's blobs too: both limits said
            raise error(f"{path}: {what} resolves to {real}, outside its snapshot {root} and its repository's blobs "
                        f"folder {blobs}",  # (hp63a c39: the snapshot alone was named, which every blob leaves)
                        hint="a cache snapshot's files are links into its repository's blobs folder; fetch the "
                             "model again (huggingface-cli download) or fix the link")
        raise error(f"{path}: {what} resolves to {real}, outside {root}",
                    hint="a model's files must lie inside its own directory; fix the index or the link")
    return real


# The files a model directory's readers open by name (transformers' configs and tokenizers, and the
# weights): they follow links, so each must be checked before a directory is handed to them.
# The tokenizer's files by name: the union of transformers' tokenizer classes' vocab_files_names (4.x and 5.x), with
# its configs. One list for what a merge copies, what a resume stamps and what statistics digest: PhoBERT's bpe.codes
# was none of them, so its merged model could not load its tokenizer and a changed one went unseen (hp40 P1, P2).
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                        "sentencepiece.bpe.model", "sentencepiece.model", "spm.model", "spm_char.model", "bpe.codes",
                        "source.spm", "target.spm", "target_vocab.json", "vocab-src.json", "vocab-tgt.json",
                        "byte_maps.json", "emoji.json", "entity_vocab.json", "normalizer.json",
                        "prophetnet.tokenizer", "word_pronunciation.json", "word_shape.json")
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILE_NAMES, "chat_template.json",
               "chat_template.jinja", "preprocessor_config.json", "processor_config.json")
MODEL_SUFFIXES = (".tiktoken",)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def model_dir_files(source: str | os.PathLike, role: str, error: type[TiesMergeError] = CheckpointError) -> list[Path]:
    """The files of a model directory that transformers, a tokenizer or tiesmerge would open (configs,
    tokenizer files, chat template, weights), each checked to be a regular file inside the directory:
    a link leaving it, a loop, a dangling link, a FIFO or a device is an error naming the file, before
    anything reads it (a FIFO would block a reader; a link would read someone else's file)."""
    source = Path(source)
    try:
        names = sorted(os.listdir(source))
    except OSError as exc:
        raise error(f"{source}: cannot list {role}'s directory ({exc.strerror or exc})") from None
    files, refused = [], []
    for name in names:
        try:
            if name == CHAT_TEMPLATES_DIR:  # transformers reads every *.jinja in it with the tokenizer
                files += _chat_templates(source, role, error)
                continue
            if name not in MODEL_FILES and not name.endswith(MODEL_SUFFIXES + WEIGHT_SUFFIXES):
                continue
            files.append(_model_file(source / name, source, f"{role}'s {name}", error,
                                     weights=name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".json")))
        except TiesMergeError as exc:  # every bad file of the folder, not one per run (hp65a c58: four links out)
            refused.append(exc)
    if len(refused) == 1:
        raise refused[0]
    if refused:
        first = refused[0]
        others = "".join(f"\nalso: {e.message.splitlines()[0]}" for e in refused[1:])
        try:
            combined = type(first)(f"{first.message}{others}", hint=first.hint)
        except TypeError:  # an error type built otherwise: its own words, the first file's
            raise first from None
        raise combined from None
    return files


def _check_other_entries(source: Path, checked: set[str], role: str, error: type[TiesMergeError]) -> None:
    """Every other top-level entry of a folder handed to transformers: each tokenizer class opens files of its own
    names (Whisper's normalizer.json, LUKE's entity_vocab.json, spm.model, ...), which no fixed list covers. A link
    leaving the folder, a dangling link, a FIFO or a device there is refused, whatever its name, and so is a text
    file a tokenizer reads whole (.json, .txt, .model, ...) past :data:`MAX_MODEL_FILE_BYTES` (a sparse 20 GiB
    normalizer.json would fill the memory); other regular files and folders inside are left to transformers."""
    try:
        names = sorted(os.listdir(source))
    except OSError as exc:
        raise error(f"{source}: cannot list {role}'s directory ({exc.strerror or exc})") from None
    for name in names:
        if name in checked or name == CHAT_TEMPLATES_DIR:
            continue
        path = source / name
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            continue
        if stat.S_ISREG(mode):
            _check_text_size(path, path, role, error)
            continue
        if stat.S_ISLNK(mode):
            real = inside(path, source, f"{role}'s {name}", error)  # a link leaving the folder: refused here
            if os.path.isdir(real):
                continue
            if stat.S_ISREG(os.stat(real).st_mode):
                _check_text_size(path, Path(real), role, error)
                continue
            mode = os.stat(real).st_mode
        raise error(f"{path}: {role}'s {name} is {_kind(mode)}, which transformers may open and block on",
                    hint="remove it from the model folder (or replace it with the file itself)")


# what tokenizers of every class read whole (vocabularies, merges, normalizers, sentencepiece models, templates)
_TEXT_SUFFIXES = frozenset({".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".spm", ".bpe", ".merges",
                            ".yaml", ".yml", ".tsv", ".csv"})


def _check_text_size(path: Path, real: Path, role: str, error: type[TiesMergeError]) -> None:
    if path.suffix.lower() not in _TEXT_SUFFIXES:
        return
    size = os.stat(real).st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise error(f"{path}: {role}'s {path.name} is {format_size(size)}, more than the "
                    f"{format_size(MAX_MODEL_FILE_BYTES)} a tokenizer or config file may take (transformers may read "
                    "it whole into memory)", hint="remove it from the model folder, or replace it with the real file")


# a tokenizer's extra chat templates (tool use, RAG...), one file each: read by transformers, copied to the output
CHAT_TEMPLATES_DIR = "additional_chat_templates"
# configs, tokenizer files and templates are read whole by transformers: a multi-GB one would fill the memory
MAX_MODEL_FILE_BYTES = 64 << 20


def _model_file(path: Path, source: Path, what: str, error: type[TiesMergeError], *, weights: bool = False) -> Path:
    """``path`` checked as a regular file inside ``source`` (and, unless it holds weights, of a size
    transformers can read whole)."""
    real = inside(path, source, what, error)
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is {'a directory' if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)}, not a "
                    "regular file", hint="replace it with the file itself")
    if not weights and st.st_size > MAX_MODEL_FILE_BYTES:
        raise error(f"{path}: {what} is {format_size(st.st_size)}, more than the {format_size(MAX_MODEL_FILE_BYTES)} "
                    "a config, tokenizer or template file may hold", hint="the file is damaged or not what its name "
                                                                         "says; replace it with the model's own")
    return path


def _chat_templates(source: Path, role: str, error: type[TiesMergeError]) -> list[Path]:
    folder = source / CHAT_TEMPLATES_DIR
    real = inside(folder, source, f"{role}'s {CHAT_TEMPLATES_DIR}", error)
    if not os.path.isdir(real):
        raise error(f"{folder}: {role}'s {CHAT_TEMPLATES_DIR} is not a folder", hint="remove it or make it a folder")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise error(f"{folder}: cannot list {role}'s {CHAT_TEMPLATES_DIR} ({exc.strerror or exc})") from None
    return [_model_file(folder / n, source, f"{role}'s chat template {n}", error) for n in names
            if n.endswith(".jinja")]


# a tokenizer's own files (its vocabulary): without one, transformers builds an empty tokenizer and every word is
# unknown
TOKENIZER_FILES = tuple(n for n in TOKENIZER_FILE_NAMES if n not in ("tokenizer_config.json", "special_tokens_map.json",
                                                                   "added_tokens.json"))


def check_model_dir(source: str | os.PathLike, role: str, error: type[TiesMergeError] = CheckpointError,
                    *, tokenizer: bool = True) -> Path:
    """``source`` as a directory whose model files may be handed to transformers (see
    :func:`model_dir_files`) and, with ``tokenizer``, that holds a tokenizer (a model read as text
    with none would score every input as unknown tokens, silently); or an error naming what is wrong."""
    check_input(source, role, error)
    if not os.path.isdir(source):
        raise error(f"{source}: {role} is not a directory", hint="give the model's Hugging Face directory")
    names = {f.name for f in model_dir_files(source, role, error)}
    _check_other_entries(Path(source), names, role, error)
    if os.path.lexists(Path(source) / "adapter_config.json"):  # transformers would wrap the model with the adapter
        if not any(n == "config.json" or n.endswith((".safetensors", ".bin")) and not n.startswith("adapter_")
                   for n in names):  # an adapter folder alone: it is no model
            raise error(f"{source}: {role} is a PEFT adapter (adapter_config.json), not a model: this needs the "
                        "fine-tuned model itself",
                        hint="merge the adapter into its base first (PeftModel.merge_and_unload(), then "
                             "save_pretrained) and give that folder")
        raise error(f"{source}: {role} holds a PEFT adapter (adapter_config.json) beside its model files; "
                    "transformers would apply the adapter when loading it, and tiesmerge's merge reads such a folder "
                    "as the adapter alone", hint="keep the adapter in a folder of its own (and the model in another)")
    if tokenizer and not names & set(TOKENIZER_FILES) and not any(n.endswith(MODEL_SUFFIXES) for n in names):
        raise error(f"{source}: {role} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...), so its text "
                    "inputs cannot be read", hint="copy the tokenizer files of the model's base into it "
                    "(tokenizer.save_pretrained(DIR))")
    return Path(source)


@dataclass(frozen=True)
class FileStamps:
    """What must not change while a file is read: (device, inode, size, mtime, ctime) per file. A
    model that another process is writing (a download, a copy still running) is refused, not merged.
    The ctime catches a rewrite whose writer restored the mtime (``touch -r``, ``cp -p``, ``os.utime``):
    no writer can set it back."""

    stamps: tuple[tuple[Path, tuple[int, int, int, int, int]], ...]

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int, int, int]:
        st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of(cls, files: Iterable[Path]) -> FileStamps:
        return cls(tuple((Path(f), cls._stamp(Path(f))) for f in files))

    def check(self, label: str = "input") -> None:
        for path, before in self.stamps:
            try:
                now = self._stamp(path)
            except OSError:
                now = None
            if now != before:
                what = "disappeared" if now is None else (
                    f"changed size ({before[2]} -> {now[2]} bytes)" if now[2] != before[2] else
                    "was replaced by another file" if now[:2] != before[:2] else
                    "was modified" if now[3] != before[3] else
                    "was rewritten or its metadata changed (its change time moved, though its modification time "
                    "did not)")
                raise CheckpointError(f"{path}: {label} {what} while tiesmerge read it",
                                      hint="wait until the download or copy has finished, then run again")


def _protected() -> list[Path]:
    """Folders that are never an output: the root, the home folder, the working folder and
    every folder above them (replacing one would delete the user's files, or the shell's cwd)."""
    out: list[Path] = []
    for where in (Path.cwd, Path.home):
        try:  # a working folder deleted while a merge ran (checked again at its end) protects nothing any more
            real = Path(os.path.realpath(where()))
        except (OSError, RuntimeError):  # RuntimeError: Path.home() without HOME or a passwd entry
            continue
        out += [real, *real.parents]
    return out


def _is_protected(final: Path) -> bool:
    """``final`` is one of :func:`_protected`'s folders, by path or, reached through another mount of it, by
    device and inode."""
    protected = _protected()
    key = identity(final)
    return final in protected or (key is not None and key in {identity(p) for p in protected})


DEMO_MARKER = ".tiesmerge-demo"  # in a --workdir the demo made: a later demo may write there again


def demo_workdir(workdir: str | os.PathLike) -> Path:
    """``tiesmerge demo --workdir``: a new or empty folder, or one an earlier demo made (its marker
    written first); never a model, the working, home or root folder, or a folder of the user's files,
    whose config or weights a demo model would overwrite."""
    final = _final(workdir)
    if _is_protected(final):
        raise OutputError(f"{workdir}: the demo would write its models into {final}, which holds the working, home "
                          "or root folder", hint="name a new folder, e.g. --workdir ./tiesmerge-demo")
    if os.path.lexists(final):
        if not os.path.isdir(final):
            raise OutputError(f"{workdir}: --workdir is not a folder", hint="name a new folder")
        entries = sorted(os.listdir(final))
        if entries and DEMO_MARKER not in entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise OutputError(f"{workdir}: --workdir holds files an earlier demo did not write ({shown})",
                              hint="name a new or empty folder: the demo writes base/, ft-*/ and merged-*/ there")
        if DEMO_MARKER in entries:
            _check_demo_files(workdir, final)
    else:
        _check_writable_parent(workdir, final)
    final.mkdir(parents=True, exist_ok=True)
    # what the earlier demo recorded stays until this one has written its models (demo_models_written)
    recorded = _demo_record(final / DEMO_MARKER) if os.path.lexists(final / DEMO_MARKER) else {}
    _write_demo_record(final, recorded, writing=True)
    return final


def _demo_record(marker: Path) -> dict:
    """The stamps of the model files an earlier demo wrote (an older demo's marker, plain text, records none)."""
    import json

    try:
        data = json.loads(read_regular(marker, "the demo's marker", max_bytes=16 << 20))
    except (TiesMergeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("written"), dict) else {}


def _write_demo_record(root: Path, recorded: dict, *, writing: bool) -> None:
    import json

    note = "written by tiesmerge demo; a later demo may replace the models here (these files, unchanged)"
    write_file(root / DEMO_MARKER, json.dumps({"note": note, "written": recorded.get("written", {}),
                                               "writing": writing}, indent=1) + "\n")  # replaces a link, never through


def _check_demo_files(workdir: str | os.PathLike, final: Path) -> None:
    """A later demo rewrites base/ and ft-*/ of an earlier one: only files that demo wrote, unchanged since (its
    stamps), never a link, hard links included (the marker too); a demo that stopped while writing its models
    (``writing``) may replace its own regular files. merged-*/ are outputs, checked as every output is."""
    marker = final / DEMO_MARKER
    if not stat.S_ISREG(os.lstat(marker).st_mode):
        raise OutputError(f"{workdir}: --workdir's {DEMO_MARKER} is not a regular file (a link, or another kind of "
                          "entry), so no demo wrote this folder", hint="name a new or empty folder")
    record = _demo_record(marker)
    written = record.get("written", {})
    foreign = []
    for rel in listing(final):
        if rel == DEMO_MARKER or rel.split(os.sep)[0].startswith("merged-"):
            continue
        path = final / rel
        if os.path.islink(path) or not os.path.isfile(path):
            foreign.append(f"{rel} (a link)" if os.path.islink(path) else rel)
        elif os.lstat(path).st_nlink > 1:  # the demo writes in place: through a hard link, into another name's file
            foreign.append(f"{rel} (a hard link)")  # (hostile pass 29, F4)
        elif not (record.get("writing") and (rel in written or _written_by_a_demo(rel))
                  or rel in written and stamp_holds(written[rel], path)):
            foreign.append(rel)
    if foreign:  # the merged models' own problems in the same refusal, not one refusal after another (hp28 N2)
        for entry in sorted(e for e in os.listdir(final) if e.startswith("merged-")):
            try:
                check_output_location(final / entry, True)
            except OutputError as exc:
                why = exc.message.split(": ", 1)[-1].replace("--force (force=True)", "the demo")
                foreign.append(f"{entry}/ ({why.replace('--force', 'the demo')})")
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(f"{workdir}: --workdir holds files the earlier demo did not write, or that changed since "
                          f"({shown}); the demo would overwrite them", hint="name a new or empty folder, or move "
                                                                            "those files away")


_DEMO_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _written_by_a_demo(rel: str) -> bool:
    """A file a demo writes into a model folder of its --workdir (base/, ft-*/: config, tokenizer, weights): what a
    demo stopped while writing them left (killed before its marker recorded them: hostile pass 29, F2)."""
    parts = rel.split(os.sep)
    return len(parts) == 2 and (parts[0] == "base" or parts[0].startswith("ft-")) and \
        (parts[1] in MODEL_FILES or _DEMO_WEIGHTS.fullmatch(parts[1]) is not None)


def remove_demo_files(root: str | os.PathLike) -> None:
    """Remove what a demo wrote in ``root`` and nothing else: its marker, the files of its base/ and ft-*/ models, its
    merged-*/ outputs (each one tiesmerge wrote), then the folders left empty. A file someone else put there while the
    demo ran stays (hp38 C20: a stopped demo emptied its new --workdir of a user's file written meanwhile)."""
    import contextlib

    root = Path(root)
    try:
        entries = os.listdir(root)
    except OSError:
        return
    for entry in entries:
        path = root / entry
        if entry.startswith("merged-") and os.path.isdir(path) and not os.path.islink(path):
            try:
                check_output_location(path, True)  # a complete output tiesmerge wrote, nobody's files in it
            except TiesMergeError:
                continue
            shutil.rmtree(path, ignore_errors=True)
    for rel in listing(root):
        if rel == DEMO_MARKER or _written_by_a_demo(rel):
            with contextlib.suppress(OSError):
                os.unlink(root / rel)
    for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):  # the deepest first
        if folder != str(root):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only an empty one


def demo_models_written(root: str | os.PathLike) -> None:
    """After a demo wrote its base and fine-tunes: record their files' stamps in the marker (see demo_workdir)."""
    root = Path(root)
    if not os.path.lexists(root / DEMO_MARKER):
        return  # a temporary folder of the demo's own, removed at exit
    written = {rel: file_stamp(root / rel) for rel in listing(root)
               if rel != DEMO_MARKER and not rel.split(os.sep)[0].startswith("merged-") and os.path.isfile(root / rel)
               and not os.path.islink(root / rel)}
    _write_demo_record(root, {"written": written}, writing=False)


def demo_models_untouched(root: str | os.PathLike) -> None:
    """A demo that stopped before writing any model: its marker back as the earlier demo left it (not ``writing``,
    which lets a later demo replace any file a demo writes whatever its stamps: hp85b c36, a refused demo's marker
    let the next one overwrite base/config.json the user had edited since)."""
    root = Path(root)
    marker = root / DEMO_MARKER
    if os.path.lexists(marker) and stat.S_ISREG(os.lstat(marker).st_mode):
        _write_demo_record(root, _demo_record(marker), writing=False)


def _final(output: str | os.PathLike) -> Path:
    try:
        return Path(os.path.realpath(output))
    except (OSError, RuntimeError):
        raise OutputError(f"{output}: the output path is a symbolic link loop", hint="choose another path") from None


def _is_mount_point(path: Path) -> bool:
    """Whether a file system is mounted at ``path``: os.path.ismount's device test, and on Linux the
    mount table too, which alone shows a bind mount of a folder of the same file system (a Docker
    volume, a scratch folder bound into a container)."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            table = f.read(16 << 20)
    except OSError:
        return False
    target = os.fsencode(os.path.realpath(path))
    unescape = re.compile(rb"\\([0-7]{3})")  # mountinfo writes a space as \040
    return any(len(fields) > 4 and unescape.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4]) == target
               for fields in (line.split(b" ") for line in table.splitlines()))


def check_path_text(path: str | os.PathLike, what: str = "the output") -> None:
    """A written path holding a NUL byte, which no file name can (hp41 C70: a raw ValueError for an output or a log,
    where an input's was typed), or empty (hp41 C71: the API's ``output=""`` was taken as the working folder, and
    refused as "the output contains the base" under an empty name): a typed error."""
    text = os.fspath(path)
    from .errors import ConfigError

    if not text:
        raise ConfigError(f"{what}: the path is empty", hint="name a path (a new directory, e.g. ./merged)")
    if ("\0" if isinstance(text, str) else b"\0") in text:
        raise ConfigError(f"{what}: the path {text!r} holds a NUL byte, which no file name can",
                          hint="fix the path (in a YAML recipe, a \\0 escape writes one)")


def check_walkable(path: str | os.PathLike, what: str = "the output") -> None:
    """A ".." after a folder that does not exist (``out/missing/../m``) is a path the kernel cannot walk (it
    fails with ENOENT), though realpath folds it to ``out/m``: refused before the work, naming the folder, rather
    than written at one place and read back at the other (and a NUL byte: :func:`check_path_text`)."""
    check_path_text(path, what)
    parts = Path(os.fspath(path)).parts
    for i, part in enumerate(parts):
        if part == ".." and i and not os.path.isdir(os.path.join(*parts[:i])):
            through = os.path.join(*parts[:i])
            # a file there is no folder to walk out of (hp75b c07: a file called "does not exist")
            kind = "is a file, not a folder" if os.path.lexists(through) else "does not exist"
            raise OutputError(f"{path}: {what}'s path goes through {through}, which {kind}, and then back out of it "
                              "with '..'", hint="name the path without the '..'" + (
                                  "" if os.path.lexists(through) else " (or create that folder first)"))


def _refuse_look_alike(path: str | os.PathLike, what: str) -> None:
    """A new output whose name (or a folder on its way) is missing but printed alike by one there (the other Unicode
    normalization, an invisible character, a look-alike letter): created, it would sit beside a look-alike (hp74a
    c57: -o fx/dür/new typed composed made a second 'dür' beside the decomposed one, which `ls` shows twice)."""
    hint = look_alike_hint(path, new_leaf=True)
    if hint is not None:
        raise OutputError(f"{os.fspath(path)}: {what} would be created beside a name that prints alike", hint=hint)


def check_output_location(output: str | os.PathLike, force: bool, marker: str = "tiesmerge.json") -> None:
    """The output may be created, or (``force``) replace a directory tiesmerge wrote; never a
    protected folder, a file, or a folder of someone else's files."""
    check_walkable(output)
    if Path(os.fspath(output)).name.startswith(".tiesmerge-"):  # the names of tiesmerge's temporary siblings
        raise OutputError(f"{output}: names starting with '.tiesmerge-' are tiesmerge's own temporary folders, "
                          "which a later run removes (or restores from) when their process is gone",
                          hint="choose another name for the output")
    final = _final(output)
    where = physical(output)
    if os.path.islink(where):  # the user's link (dangling or not) is never replaced, --force or not: --force
        # replaces only a folder tiesmerge wrote, and a link at /dev/stdout is the system's (hp47 c56; it was
        # replaced with --force since pass 15 F8.7, as the hint offered)
        target = os.readlink(where)
        dangling = "" if os.path.exists(where) else (" that loops back on itself" if _loops(where) else
                                                      " whose target does not exist")  # (hp46 c25d)
        raise OutputError(f"{output}: the output path is a link (to {target!r}){dangling}; tiesmerge never replaces "
                          "a link, --force included", hint="choose another path, or remove the link yourself if "
                                                           "you mean to write there")
    if _is_protected(final):
        raise OutputError(f"{output}: the output would replace {final}, which holds the working, home or root "
                          "folder; tiesmerge never replaces it", hint="name a new directory, e.g. -o ./merged")
    _check_path_length(output, final)
    _check_scratch_not_output(output, final)
    if os.path.islink(where) and os.path.exists(where):  # --force given: the link itself is replaced, never what is
        return  # in its target, which is not this output's to check (as the hint without --force said); a loop: below
    try:
        st = os.stat(final)
    except FileNotFoundError:
        _refuse_look_alike(output, "the output")
        _check_writable_parent(output, final)
        _check_no_parked_output(output, final)
        return
    except NotADirectoryError:
        raise OutputError(f"{output}: cannot create the output directory: a folder on its path is a file",
                          hint="choose a location you can write to") from None
    except OSError as exc:
        raise OutputError(f"{output}: cannot check the output path ({exc.strerror or exc})",
                          hint=_write_hint(exc)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{output}: the output path is {'a file' if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)}",
                          hint="choose a directory path for the output")
    if _is_mount_point(final):  # the output is renamed into place whole, and a mount point cannot be replaced
        raise OutputError(f"{output}: the output path is a mount point (another file system is mounted there); "
                          "tiesmerge puts its output in place with one rename, which cannot replace a mount point",
                          hint=f"write into a new folder inside it, e.g. -o {os.path.join(str(output), 'merged')}")
    try:
        entries = os.listdir(final)
    except OSError as exc:
        raise OutputError(f"{output}: cannot list the output directory ({exc.strerror or exc})") from None
    if not entries:
        return
    ours = any(_is_marker(final / m) for m in OUTPUT_MARKERS)
    shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    if not force and ours:
        found = [m for m in OUTPUT_MARKERS if _is_marker(final / m)]
        if found != [marker]:  # another command's output: --force would refuse it too, so it is not offered (hp38 C50)
            kinds = " and ".join(f"{OUTPUT_KINDS[m]} ({m})" for m in found)
            raise OutputError(f"{output}: the output directory exists and holds another command's output: {kinds}",
                              hint="choose another path: --force replaces only an earlier output of the same command")
        raise OutputError(f"{output}: the output directory exists and is not empty (an earlier tiesmerge output)",
                          hint="choose another path, or pass --force (force=True) to replace it")
    if not ours and _own_file_kind(final / SEARCH_LOG) == "a search's log":  # (hp62b c19: "tiesmerge did not
        # write it", of a folder tiesmerge search wrote)
        raise OutputError(f"{output}: the output directory exists and is a search's folder (its --dir, holding "
                          f"{shown}), not an output that --force may replace",
                          hint="choose another path for the output (e.g. a folder inside the search's, such as "
                               f"{os.path.join(str(output), 'best')})")
    if not force:  # no hint at --force: it would refuse this folder too
        raise OutputError(f"{output}: the output directory exists and is not empty, and tiesmerge did not write it "
                          f"(it holds {shown})", hint="choose another path: --force replaces only a directory that "
                                                      "tiesmerge wrote")
    if not ours:
        edited = [m for m in OUTPUT_MARKERS if (final / m).exists()]  # a marker there, but not one tiesmerge wrote
        raise OutputError(f"{output}: --force replaces only a directory that tiesmerge wrote (one holding "
                          f"{', '.join(OUTPUT_MARKERS)})" + (
                              f"; its {edited[0]} is not one tiesmerge wrote (edited, or not readable as one), "
                              f"and it holds {shown}" if edited else f"; this one holds other files ({shown})"),
                          # (hp46 c34b: "holds other files (..., tiesmerge.json)" named the marker as another file)
                          hint="choose another path, or remove that directory yourself if you mean it")
    found = [m for m in OUTPUT_MARKERS if _is_marker(final / m)]
    if found != [marker]:  # another command's output (a merged model is no report to redo), or markers of two
        # kinds: a report's analysis.json moved beside a model must not turn the model into a "report" to replace
        found = [m for m in found if m != marker] or found
        raise OutputError(f"{output}: --force replaces only an earlier output of the same command "
                          f"({OUTPUT_KINDS[marker]}, holding {marker} alone); this directory holds "
                          + " and ".join(f"{OUTPUT_KINDS[m]} ({m})" for m in found),
                          hint="choose another path, or remove that directory yourself if you mean it")
    damaged = _damaged_record(final)
    if damaged:  # '', '.', '/', '..', fields of the wrong shape: a manifest tiesmerge never wrote (edited, or forged)
        raise OutputError(f"{output}: its manifest {damaged}: the manifest is damaged, so --force cannot tell its "
                          "files from yours", hint="remove that directory yourself if nothing in it is yours, or "
                                                   "choose another path")
    added = unlisted_files(final)
    changed = changed_files(final)
    if changed:
        more = ", ..." if len(changed) > 5 else ""
        kept = _stamp_fields_kept(final, changed)  # per file: 2 size and mtime as recorded, 1 the size, 0 neither
        if all(kept[c] == 2 for c in changed):  # a chmod, chown or hard link: no edit shows
            raise OutputError(f"{output}: {len(changed)} file(s) that tiesmerge wrote there changed since, as far as "
                              f"their change time tells ({', '.join(changed[:5])}{more}): their size and modification "
                              "time are the same, so a chmod, chown or hard link may be all, or the folder is a "
                              "copy (cp -a keeps the times, not the change times), but an edit that restored them "
                              "looks the same, and --force would discard it",
                              hint=_MOVE_EDITED + ", or remove that directory yourself if nothing in it is "
                                   "yours, or choose another path")
        if all(kept[c] >= 1 for c in changed):  # a copy (cp -r) moves the times, not the sizes
            raise OutputError(f"{output}: {len(changed)} file(s) that tiesmerge wrote there have another modification "
                              f"time than when it wrote them ({', '.join(changed[:5])}{more}): their sizes are the "
                              "same, so the folder may be a copy (cp -r keeps no times), but an edit that kept the "
                              "size looks the same, and --force would discard it",
                              hint=_MOVE_EDITED + ", or remove that directory yourself if nothing in it is "
                                   "yours, or choose another path")
        # surely edited first, then what may be a copy's or a chmod's doing, each kind said as such (hp47 c09: a
        # cp -a copy's untouched files were all called "your changes" beside the one file edited)
        kinds = (("of another size", 0), ("of the same size, with another modification time", 1),
                 ("with only another change time (a copy by cp -a, or a chmod, looks the same)", 2))
        parts = []
        for words, level in kinds:
            these = [c for c in changed if kept[c] == level]
            if these:
                parts.append(f"{len(these)} {words}: {', '.join(these[:5])}{', ...' if len(these) > 5 else ''}")
        raise OutputError(f"{output}: --force would discard changes to {len(changed)} file(s) that tiesmerge wrote "
                          f"there ({'; '.join(parts)})",
                          hint=_MOVE_EDITED + ", or choose another path")
    if added is None:
        raise OutputError(f"{output}: this output was written by an older tiesmerge, whose manifest does not list "
                          "its files, so --force cannot tell them from files you added since",
                          hint="remove that directory yourself if nothing in it is yours, or choose another path")
    if added:
        more = ", ..." if len(added) > 5 else ""
        # a folder another tiesmerge run wrote inside this output is not this output's either (hp62b s05: it was
        # "files that tiesmerge did not write")
        nested_outputs = sorted({a.split(os.sep, 1)[0] for a in added if os.sep in a.rstrip(os.sep)
                                 and any(_is_marker(final / a.split(os.sep, 1)[0] / m) for m in OUTPUT_MARKERS)})
        raise OutputError(f"{output}: --force would delete {len(added)} file(s) that this output's manifest does not "
                          f"list (added since: {', '.join(added[:5])}{more})"
                          + (f"; {', '.join(nested_outputs[:3])} "
                             + ("is another tiesmerge output" if len(nested_outputs) == 1 else
                                "are other tiesmerge outputs") + " written inside this one" if nested_outputs else ""),
                          hint="move them out of that directory first, or choose another path")


# what lets --force go on over files a user edited: a copy kept elsewhere cannot be seen from the output, and the edited
# file is still there (hp56 c12: "copy them out" was followed, and --force refused again); moved out, it is a file
# removed since, which --force never counts as the user's
_MOVE_EDITED = "move them out of that directory first (a copy leaves them there, and this refusal stays)"

# every marker of a finished output lists the output's files (``written``: paths relative to it),
# recorded when the output is renamed into place (tiesmerge.io.writer.atomic_directory)
WRITTEN_FIELD = "written"
# and the size, modification and change time (ns) of each file but the markers, so that --force can tell a
# file a user edited since (a model card with their results) from the one tiesmerge wrote
STAMPS_FIELD = "written_stamps"


def file_stamp(path: str | os.PathLike) -> list[int]:
    """[size, mtime_ns, ctime_ns] of ``path`` itself (a link is not followed). The change time catches
    an edit whose writer restored the size and modification time (``touch -r``, ``cp -p``,
    ``os.utime``): no writer can set it back. A copy of the folder (``cp -a``) gets new change
    times too, so --force refuses to replace a copy: it says which files, nothing is lost."""
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def stamp_holds(recorded: object, path: str | os.PathLike) -> bool:
    """Whether ``path`` is unchanged since ``recorded`` (a :func:`file_stamp`, or the [size, mtime_ns]
    that tiesmerge versions before the change time recorded)."""
    if not (isinstance(recorded, list) and len(recorded) in (2, 3)):
        return False
    return file_stamp(path)[:len(recorded)] == recorded


def listing(directory: str | os.PathLike) -> list[str]:
    """Every entry under ``directory`` that is not a folder (files, links, FIFOs...), as sorted
    paths relative to it; links are listed, never followed."""
    root = str(directory)
    out = []
    for folder, dirs, files in os.walk(root):  # os.walk does not descend into linked folders
        rel = os.path.relpath(folder, root)
        out += [name if rel == "." else os.path.join(rel, name) for name in files]
        out += [name if rel == "." else os.path.join(rel, name) for name in dirs
                if os.path.islink(os.path.join(folder, name))]
    return sorted(out)


def _markers(directory: Path) -> Iterator[dict]:
    """The contents of every output marker in ``directory`` (read with the limited reader)."""
    import json

    for name in OUTPUT_MARKERS:
        if _is_marker(directory / name):
            try:  # a marker damaged past reading (nested past Python's limit) lists nothing
                yield json.loads(read_regular(directory / name, "the output marker", max_bytes=_MARKER_MAX_BYTES,
                                              error=OutputError))
            except (ValueError, RecursionError):
                yield {}


def unlisted_files(directory: Path) -> list[str] | None:
    """The entries of a tiesmerge output that none of its markers lists as written: files a user
    added (or renamed) since, which ``--force`` must not delete. None when no marker holds a listing
    (an output of an older tiesmerge, or a marker copied from one): nothing can be told apart."""
    written: set[str] | None = None
    for data in _markers(directory):
        listed = data.get(WRITTEN_FIELD)
        if isinstance(listed, list) and all(isinstance(x, str) for x in listed):
            written = (written or set()) | set(listed)
    if written is None:
        return None
    added = [p for p in listing(directory) if p not in written]
    # a folder holding no written file (an empty one the user made, for their results) is theirs too
    parents = {str(q) for w in written for q in Path(w).parents}  # every folder that holds a written file
    for folder, dirs, _ in os.walk(directory):
        for name in dirs:
            rel = os.path.relpath(os.path.join(folder, name), directory)
            if rel not in parents and not os.path.islink(os.path.join(folder, name)) and \
                    not any(a.startswith(rel + os.sep) for a in added):
                added.append(rel + os.sep)
    return sorted(added)


def _damaged_record(directory: Path) -> str | None:
    """What makes an output's markers' record of its files (``written``, the stamps) unusable, or None: entries that
    are no relative path of a file inside it, or fields of the wrong shape (an edited or forged manifest). Said as
    the manifest's damage: read as they were, a stamps field that is no record made every file "changed" (of another
    size), and a ``written`` that is no list made the output "an older tiesmerge's"."""
    import json

    bad: list[str] = []
    unstamped: list[str] = []
    for data in _markers(directory):
        stamps = data.get(STAMPS_FIELD)
        written = data.get(WRITTEN_FIELD)
        if written is not None and not isinstance(written, list):
            return f"gives {WRITTEN_FIELD!r} as {_json_kind(written)}, not a list of the files it wrote"
        if stamps is not None and not isinstance(stamps, dict):
            return f"gives {STAMPS_FIELD!r} as {_json_kind(stamps)}, not each file's size and times"
        listed = [r for r in written or () if isinstance(r, str) and r not in OUTPUT_MARKERS]
        if stamps is None and listed:  # removed or null: every file was then "of another size" (hp69a c34, c38)
            return (f"lists {len(listed)} file(s) it wrote but has no {STAMPS_FIELD!r} (their sizes and times: "
                    f"{'removed' if STAMPS_FIELD not in data else 'null'})")
        for rel in [*(written or ()), *(stamps or ())]:
            if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts \
                    or os.path.normpath(rel) == ".":
                bad.append(str(rel))
        for rel, stamp in (stamps or {}).items():
            if not _is_stamp(stamp):
                shown = json.dumps(stamp)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                return f"records {str(rel)[:80]!r} as {shown}, not its size and times (two or three whole numbers)"
        if isinstance(stamps, dict) and isinstance(written, list):  # tiesmerge stamps every file it lists but the
            # markers: one listed without a stamp is an edited record, said so (hp57 c22: "of another size")
            unstamped += [r for r in written if isinstance(r, str) and r not in OUTPUT_MARKERS and r not in stamps
                          and r not in bad and os.path.lexists(directory / r)]  # (one removed since: nothing to keep)
    if bad:
        bad = sorted(set(bad))
        return (f"lists {', '.join(repr(d) for d in bad[:3])} among the files it wrote, which names no file inside "
                "the output")
    if unstamped:
        return (f"lists {unstamped[0][:80]!r} among the files it wrote but records no size and times for it "
                f"({len(unstamped)} file(s) so)")
    return None


def _json_kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a text", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")


def _stamp_fields_kept(directory: Path, names: list[str]) -> dict[str, int]:
    """Per file of ``names``: 2 where its size and modification time are as recorded (only the change time moved: a
    chmod, chown, hard link or ``cp -a``, or an edit that restored both), 1 where only its size is (a ``cp -r`` copy,
    or an edit of the same size), 0 otherwise. The markers are read once, each file stat'ed once."""
    recorded: dict[str, object] = {}
    for data in _markers(directory):
        stamps = data.get(STAMPS_FIELD)
        recorded.update(stamps if isinstance(stamps, dict) else {})
    kept = {}
    for rel in names:
        stamp = recorded.get(rel)
        try:
            now = file_stamp(directory / rel) if isinstance(stamp, list) and len(stamp) == 3 else None
        except OSError:
            now = None
        kept[rel] = 0 if now is None or now[0] != stamp[0] else 2 if now[1] == stamp[1] else 1  # type: ignore[index]
    return kept


def changed_files(directory: Path) -> list[str]:
    """The files of a tiesmerge output whose size or modification time differs from what its markers
    recorded when the output was finished: a user's edits, which ``--force`` must not discard. A file
    removed since is not listed (nothing of the user's is in it); a file listed as written but never stamped
    is (nothing vouches for it)."""
    changed: set[str] = set()
    for data in _markers(directory):
        stamps = data.get(STAMPS_FIELD)
        stamps = stamps if isinstance(stamps, dict) else {}
        written = data.get(WRITTEN_FIELD)
        for rel in written if isinstance(written, list) else ():
            # listed as written but never stamped: nothing vouches that tiesmerge wrote what lies there now (an
            # edited manifest could list a user's notes.txt), so --force must not delete it
            if isinstance(rel, str) and rel not in OUTPUT_MARKERS and rel not in stamps and \
                    os.path.lexists(directory / rel):
                changed.add(rel)
        for rel, recorded in stamps.items():
            if not isinstance(rel, str) or rel in OUTPUT_MARKERS:
                continue
            try:
                unchanged = stamp_holds(recorded, directory / rel)
            except OSError:
                continue  # removed since
            if not unchanged:
                changed.add(rel)
    return sorted(changed)


def is_output_marker(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a marker file (``tiesmerge.json``, ...) that tiesmerge wrote into an output."""
    path = Path(path)
    return path.name in OUTPUT_MARKERS and _is_marker(path)


def _is_marker(path: Path) -> bool:
    """``path`` is a marker tiesmerge wrote: a regular file (not a link), JSON holding every field
    its writer always writes (a merge's ``output`` with its ``files`` list). Read with the limited
    reader: a FIFO, a huge file or garbage is simply not a marker."""
    import json

    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        data = json.loads(read_regular(path, "the output marker", max_bytes=_MARKER_MAX_BYTES, error=OutputError))
    except (TiesMergeError, ValueError, RecursionError):
        return False
    if not isinstance(data, dict) or not all(k in data for k in _MARKER_FIELDS[path.name]):
        return False
    if path.name == "tiesmerge.json":
        output = data["output"]
        return isinstance(output, dict) and isinstance(output.get("files"), list)
    return isinstance(data["tiesmerge_version"], str)


# what a path inside the output adds to the output's own: the temporary sibling it is written in
# (".tiesmerge-tmp-<host>-<pid>-<random>", ~45 bytes) and the longest name tiesmerge writes there
# ("additional_chat_templates/<name>.jinja", "model-00001-of-00099.safetensors", analysis files: < 200)
_INNER_PATH_BYTES = 256


def _write_hint(exc: OSError) -> str:
    """What to do about an output path the system would not even look at."""
    if exc.errno == errno.ENAMETOOLONG:
        return "use a shorter name (a file system allows 255 bytes per name)"
    if exc.errno == errno.ELOOP:
        return "a link on the path points back at itself: fix or remove it, or choose another path"
    return "choose a location you can write to"


def _check_path_length(output: str | os.PathLike, final: Path) -> None:
    """An output whose files' paths would pass the system's PATH_MAX (4096 bytes on Linux) fails at its
    first write, after the work: refused now instead, naming -o."""
    folder = final.parent
    while not os.path.isdir(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        limit = 4096
    length = len(os.fsencode(str(final)))
    if length + _INNER_PATH_BYTES > limit:
        raise OutputError(f"{output}: the output path is {length} bytes long; with the files written inside it, "
                          f"paths would pass the system's limit of {limit} bytes",
                          hint="choose a shorter output path")


def _check_writable_parent(output: str | os.PathLike, final: Path) -> None:
    """A new output is created beside its folders: the nearest folder that exists must be a directory
    this process may write, and each name to be made there fit the file system, checked now rather than when the
    merge (or a whole tune, a whole adapt run: hp60b c43, c45) is done."""
    check_creatable(output, "the output directory", "choose a location you can write to", target=final)


def _check_no_parked_output(output: str | os.PathLike, final: Path) -> None:
    """A run killed between a --force's two renames parks the previous output in a dead ``.tiesmerge-old-`` folder
    beside it; the next write there puts it back, so a new output at that path was refused only after its whole merge
    (hp61a c31: "exists and is not empty", the parked output never named). Said now instead."""
    from .scratch import host_tag, process_is_dead

    pattern = re.compile(rf"^\.tiesmerge-old-{host_tag()}-(\d+)-[A-Za-z0-9_]+$")
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m and process_is_dead(m.group(1)) and os.path.lexists(os.path.join(entry.path, final.name)):
            raise OutputError(f"{output}: a run killed while replacing it left the previous output parked in "
                              f"{entry.path}; the next write there puts it back at this path",
                              hint=f"move it back yourself (mv {shlex.quote(os.path.join(entry.path, final.name))} "
                                   f"{shlex.quote(str(output))}), "
                                   "then run again with --force to replace it, or choose another output path")


def check_creatable(path: str | os.PathLike, what: str, hint: str, target: Path | None = None) -> None:
    """A file a run creates later (a search's log, with its first scored candidate), checked now without creating
    anything: the nearest existing folder on its path is a folder this process may write, and no name to be made
    there passes the file system's limit (hp60b c20, c21: a parent that is a file, a 300-byte name: an
    untyped FileExistsError or ENAMETOOLONG after the first candidate, its new folders left behind)."""
    target = target or Path(os.path.abspath(path))
    folder, made = target.parent, [target.name]
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder.name)
        folder = folder.parent
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: cannot create {what}: {folder} is not a folder", hint=hint)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot create {what}: {folder} is not writable", hint=hint)
    kind = kernel_file_system(folder)
    if kind is not None:  # os.access says root may write there; the kernel refuses files only at the write, after the
        # work (or, in cgroup2, makes a control group of a folder): refused now
        raise OutputError(f"{path}: cannot create {what}: {folder} lies in the kernel's {kind} file system, which "
                          "holds no files of yours", hint=hint)
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    long_name = next((n for n in made if len(os.fsencode(n)) > longest), None)
    if long_name is not None:
        raise OutputError(f"{path}: cannot create {what}: the name {long_name[:40]!r}... is "
                          f"{len(os.fsencode(long_name))} bytes, past the file system's {longest}",
                          hint=f"use a shorter name; {hint}")


# file systems through which the kernel shows and takes its own state: no user file can be made in them (as root, a
# folder made in cgroup2 is a new control group)
_KERNEL_FILE_SYSTEMS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
                                  "bpf", "fusectl", "efivarfs", "binfmt_misc", "devpts", "selinuxfs", "configfs",
                                  "mqueue"})


def kernel_file_system(folder: str | os.PathLike) -> str | None:
    """The type of the kernel's own file system (/proc, /sys, ...) that ``folder`` lies in, from
    /proc/self/mountinfo (the innermost mount holding it); None for any other, or where it cannot be told."""
    real = os.path.realpath(folder)
    best, kind = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 22).splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts = fields.split(" ")
        if len(parts) < 5 or not tail:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])  # "\040" is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split(" ", 1)[0]
    return kind if kind in _KERNEL_FILE_SYSTEMS else None


def identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of ``path`` (links followed), what a folder is whatever path reaches it (a second
    mount of it, a bind mount, an NFS export mounted twice); None where it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def identities(path: Path) -> dict[tuple[int, int], Path]:
    """:func:`identity` of ``path`` and of each of its folders that exists, innermost first."""
    out: dict[tuple[int, int], Path] = {}
    for p in (path, *path.parents):
        key = identity(p)
        if key is not None:
            out.setdefault(key, p)
    return out


def _same_place(output: Path, src: Path) -> str | None:
    """How ``output`` relates to input ``src`` by identity rather than by path: "is", "contains" (the
    output is an existing folder above the input) or "lies inside" (the input is a folder above the
    output); None when neither. Catches what the resolved paths miss (a bind mount of the same folder)."""
    key = identity(src)
    if key is None:
        return None
    around = identities(output)
    if key in around:
        return "is" if around[key] == output else "lies inside"
    out = identity(output)
    return "contains" if out is not None and out in identities(src) else None


def check_not_input(output: str | os.PathLike, named: Sequence[tuple[str, Any]], what: str = "the output",
                    hint: str = "choose an output directory outside the inputs") -> None:
    """The output must not be, hold, or lie inside any input (``named``: (role, source) pairs;
    sources that are not paths, e.g. state dicts, are skipped), links followed, and the same
    folder reached another way (a second mount) told by its device and inode. ``what`` and ``hint``: how the
    output is named (a search's log is no "output directory": hp88b c35)."""
    check_path_text(output)
    final = _final(output)
    for who, source in named:
        for src in input_roots(source):
            how = _same_place(final, src)
            if how == "lies inside" and src not in final.parents:
                raise OutputError(f"{output}: {what} lies inside {who} ({source}), reached through another "
                                  "mount of the same folder; writing there would change an input",
                                  hint=hint)
            if how in ("is", "contains") and not (src == final or final in src.parents):
                raise OutputError(f"{output}: {what} {how} {who} ({source}), reached through another mount "
                                  "of the same folder; writing there would replace an input of this command",
                                  hint=hint)
            if src == final or final in src.parents:
                raise OutputError(f"{output}: {what} {'is' if src == final else 'contains'} {who} ({source}); "
                                  "writing there would replace an input of this command",
                                  hint=hint)
            if src in final.parents:
                raise OutputError(f"{output}: {what} lies inside {who} ({source})"
                                  + (f" (its files live in {src})" if src != input_roots(source)[0] else "")
                                  + "; writing there would change an input",
                                  hint=hint)
    _check_scratch_outside(named)


def _check_scratch_outside(named: Sequence[tuple[str, Any]]) -> None:
    """The temporary folder ($TMPDIR) must not lie in an input: tiesmerge and the libraries it runs (torch, numba,
    matplotlib, Ray) make folders there, which would change the input while the command runs and stay in it if the
    command is killed (hostile pass 32, C94)."""
    from .errors import ConfigError
    from .scratch import scratch_dir

    scratch = Path(os.path.realpath(scratch_dir()))  # gettempdir() would write a probe file there first (hp40b C16)
    for who, source in named:
        for src in input_roots(source):
            if _same_or_inside(scratch, src):
                raise ConfigError(f"the temporary folder {scratch} (TMPDIR) lies inside {who} ({source}): tiesmerge "
                                  "and the libraries it runs (torch, numba, matplotlib) make folders there, which "
                                  "would change an input", hint="point TMPDIR at a folder outside the command's inputs")


def _check_scratch_not_output(output: str | os.PathLike, final: Path) -> None:
    """The temporary folder ($TMPDIR) must not be the output or lie inside it: tiesmerge's own private torch folder
    and the libraries' folders are made there, and the output is replaced whole. Said as the cause, before the
    output's contents are looked at (hp40b C17: that private folder was blamed as a file of the user's)."""
    from .scratch import scratch_dir

    scratch = Path(os.path.realpath(scratch_dir()))  # gettempdir() would write a probe file there first (hp40b C16)
    if _same_or_inside(scratch, final):
        raise OutputError(f"{output}: the temporary folder {scratch} (TMPDIR) "
                          + ("is the output" if scratch == final else "lies inside the output")
                          + ": tiesmerge and the libraries it runs (torch, numba, matplotlib) make folders there "
                            "while the command runs, and the output is written and replaced whole",
                          hint="point TMPDIR at a folder outside the output (or unset it), or choose another output "
                               "path")


def _same_or_inside(scratch: Path, folder: Path) -> bool:
    """Whether ``scratch`` is ``folder`` or lies inside it: by path, or by identity (device and inode) of it or one of
    its parents, which a bind mount of ``folder`` elsewhere shares (hp49 c49, c50: TMPDIR through a bind mount of a
    model made torch's folder inside it)."""
    if scratch == folder or folder in scratch.parents:
        return True
    try:
        wanted = os.stat(folder)
    except OSError:
        return False
    for place in (scratch, *scratch.parents):
        try:
            st = os.stat(place)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


def input_roots(source: Any) -> list[Path]:
    """Where an input's files live, links resolved: the path itself and, for a snapshot of the Hugging
    Face cache, its repository's blobs folder (the snapshot's files are links into it); for a weights file given
    directly, the model folder holding it (one with a config.json). Not a path (a state dict), or unreadable
    (reported when it is opened): none."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    try:
        roots = _roots(source)
        if len(roots) > 1:  # a snapshot of the cache: its whole repository folder (refs, blobs, snapshots)
            roots.append(Path(os.path.realpath(physical(source).parent.parent)))
        folder = Path(os.path.realpath(source)).parent
        weights = os.fsdecode(source).lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
        if weights and os.path.isfile(source) and (folder / "config.json").is_file() and folder not in roots:
            # a weights file given directly from a model's folder: that folder is the input's too (hp40b C64: -o
            # base/sub wrote a folder into the model folder holding base/model.safetensors); a recipe or data file
            # beside a config.json is itself only (hp88a c79: -o proj/merged "lies inside the recipe")
            roots.append(folder)
        return roots
    except (OSError, RuntimeError, ValueError):
        return []


def nested(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether paths ``a`` and ``b`` are the same or one lies inside the other (links followed)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def held_through_mount(path: str | os.PathLike, output: str | os.PathLike) -> bool:
    """Whether an existing ``output`` is ``path`` or holds it, by device and inode (a bind mount, a second mount),
    where the paths differ: a file or folder written there would be inside the output, which the command replaces
    whole at its end (caught before the work, not after it: hp55 c21, c60, c62)."""
    theirs = identity(output)
    if theirs is None or nested(path, output):
        return False
    return theirs in identities(physical(path))  # ``path``, or a folder above it, is the output


# a file of the kind ``what`` writes that its own check no longer takes: cut or edited, not another command's (hp78b
# c27: a cut adapt checkpoint was "a file tiesmerge wrote as an adapt checkpoint, not as the checkpoint")
_SAME_KIND = {("tune's --json scores", "--json"), ("an adapt checkpoint", "the checkpoint")}


def _own_file_kind(path: Path) -> str | None:
    """What another tiesmerge command wrote at ``path``, from its first bytes: its refusal as --json or a checkpoint
    named it "a file tiesmerge did not write" (hp40 C2)."""
    try:  # a regular file only: a FIFO planted at log.jsonl beside a results.md would block the open forever
        fd = open_regular(path, "a file", OutputError)
    except (OutputError, OSError):
        return None
    try:
        head = os.read(fd, 1 << 20)  # a search log's header may pass 4 KiB (a long evaluator name: hp55 c59)
    except OSError:
        return None
    finally:
        os.close(fd)
    if b'"tiesmerge-search/' in head.split(b"\n", 1)[0]:
        return "a search's log"
    if b"tiesmerge-adapt-checkpoint/" in head:
        return "an adapt checkpoint"
    if head.lstrip().startswith(b"{") and b'"points"' in head and b'"method"' in head:
        return "tune's --json scores"
    if path.name in ("results.md", "report.html") and path.parent / "log.jsonl" != path and \
            _own_file_kind(path.parent / "log.jsonl") == "a search's log":  # (hp53 c14: "did not write")
        return "a search's report"
    return None


def _file_example(text: str) -> str:
    """A file name for an output file given as a folder's spelling (``out.json/``, ``od/.``): the name without its
    ending, or a file inside it where that is an existing folder (hp75b c06: "e.g. od", itself refused)."""
    stripped = text.rstrip("/." + os.sep)
    if not stripped:
        return "scores.json"
    return os.path.join(stripped, "scores.json") if os.path.isdir(stripped) else stripped


def check_output_file(path: str | os.PathLike, force: bool, named: Sequence[tuple[str, Any]], what: str,
                      ours: Callable[[Path], bool] | None = None) -> None:
    """A single output file (``tune --json``, ``adapt --checkpoint``), checked before any work: it is
    not, and does not lie inside, an input (``named``; links followed); its folder exists; an existing
    path is replaced only with ``force``, and only when it is a link (replaced itself, never followed)
    or a file that ``ours`` recognises as one tiesmerge wrote (no predicate: none is), never a
    user's file that happens to sit at that path."""
    check_walkable(path, what)
    text = os.fspath(path)
    if text == "-":  # the shell's "standard output": written as a file named '-' (hp74b c15)
        raise OutputError(f"-: {what} is written to a file, and '-' (standard output, to most tools) would be a file "
                          "named '-' in the working folder", hint=f"give {what} a file name, e.g. scores.json")
    if isinstance(text, str) and (text.endswith(("/", os.sep)) or os.path.basename(text) in (".", "..")):
        # Path() drops it: "out.json/" (or "out.json/.", hp74b c14) was written as the file out.json, where the shell
        # (and the user) read a folder (hp63b c31)
        ending = "/" if text.endswith(("/", os.sep)) else "/" + os.path.basename(text)
        raise OutputError(f"{os.fspath(path)}: ends with '{ending}', which names a folder, and {what} is a file",
                          hint=f"name the file itself, e.g. {_file_example(os.fspath(path))}")
    path = Path(path)
    if path.name == SEARCH_STAMPS:  # a search's lasting record, no temporary (hp81b c30)
        raise OutputError(f"{path}: is a search's record of its report files ({SEARCH_STAMPS}), which the search "
                          "reads back when it resumes", hint=f"choose another name for {what}")
    if path.name.startswith(".tiesmerge-"):  # the names of tiesmerge's staged files, which a later run removes
        raise OutputError(f"{path}: names starting with '.tiesmerge-' are tiesmerge's own temporary files, which a "
                          "later run removes when their process is gone", hint=f"choose another name for {what}")
    for who, source in named:  # links followed: a link to an input is refused too
        for src in input_roots(source):
            for cand in {physical(path), _final(path)}:
                how = _same_place(cand, src)  # the same file or folder reached through another mount too
                if how in ("is", "lies inside") and not (src == cand or src in cand.parents):
                    # one file under two names in one file system is a hard link; a folder, another mount of it
                    way = ("reached through a link" if os.path.islink(cand) else
                           "a hard link to the same file" if how == "is" and not stat.S_ISDIR(os.stat(src).st_mode)
                           else "reached through another mount of the same folder")
                    raise OutputError(f"{path}: {what} {how} {who} ({source}), {way}; writing there would change "
                                      "an input", hint="choose a path outside the inputs")
                if src == cand or src in cand.parents:
                    raise OutputError(f"{path}: {what} {'is' if src == cand else 'lies inside'} {who} ({source}); "
                                      "writing there would change an input", hint="choose a path outside the inputs")
    parent = physical(path).parent
    if not os.path.isdir(parent):
        blocker = next((p for p in (parent, *parent.parents) if os.path.lexists(p)), None)
        if blocker is not None and not os.path.isdir(blocker):  # hp41 C36: "does not exist" of an existing file
            raise OutputError(f"{path}: {what}'s folder {parent} does not exist: {blocker} is a file, not a folder",
                              hint="name a path whose folders are folders")
        raise OutputError(f"{path}: {what}'s folder {parent} does not exist",
                          hint=look_alike_hint(path) or "create it first or name another")
    if not os.access(parent, os.W_OK | os.X_OK):  # EROFS too: said now, not after the work
        raise OutputError(f"{path}: {what}'s folder {parent} is not writable",
                          hint="choose a location you can write to")
    kind = kernel_file_system(parent)
    if kind is not None:  # root may "write" /proc, as os.access tells it: refused at the write, after the work
        raise OutputError(f"{path}: {what}'s folder {parent} lies in the kernel's {kind} file system, which holds no "
                          "files of yours", hint="choose a location you can write to")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _refuse_look_alike(path, what)
        st = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot check {what} ({exc.strerror or exc})", hint=_write_hint(exc)) from None
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise OutputError(f"{path}: {what} names something other than a file "
                              f"({'a directory' if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)})",
                              hint=f"name a file for {what}"
                              + (", e.g. --json scores.json" if what == "--json" else ""))
        written_by_us = stat.S_ISLNK(st.st_mode) or (ours is not None and ours(path))
        if not written_by_us:
            folder = physical(path).parent
            # a file of an output directory (hostile pass 33, C53), of whichever command wrote it (hp35 E33)
            inside = next((m for m in OUTPUT_MARKERS if (folder / m).is_file()), None)
            kind = _own_file_kind(path) if not inside else None
            raise OutputError(f"{path}: {what} would replace "
                              + (f"a file of the tiesmerge output {folder} ({OUTPUT_KINDS[inside]}), which only a run "
                                 "writing that whole output replaces" if inside else
                                 (f"a file tiesmerge wrote as {kind}, which no longer reads as one (edited or "
                                  "damaged)" if (kind, what) in _SAME_KIND else
                                  f"a file tiesmerge wrote as {kind}, not as {what}") if kind else
                                 "a file tiesmerge did not write"),
                              hint=("delete it yourself if it is no longer needed (--force replaces only a file "
                                    "that still reads as one), or choose another path"
                                    if (kind, what) in _SAME_KIND else "choose another path (--force replaces only a "
                                    f"file tiesmerge wrote there as {what})"))
        if stat.S_ISLNK(st.st_mode):  # never replaced, --force included (hp47 c56)
            target = os.readlink(path)
            # a link into the kernel's files (/dev/stdout -> /proc/self/fd/1): no one means to remove it (hp87b c80)
            system = os.path.isabs(target) and target.split(os.sep)[1:2] in (["proc"], ["dev"], ["sys"])
            raise OutputError(f"{path}: {what} already exists as a link (to {target!r}); tiesmerge never "
                              "replaces a link, --force included",
                              hint=f"{what} is written to a regular file: give a file's path" if system else
                                   "choose another path, or remove the link yourself if you mean to write there")
        if not force:
            raise OutputError(f"{path}: {what} already exists (an earlier tiesmerge output)",
                              hint="choose another path, or pass --force to replace it")


_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
          errno.EFBIG: "the file is larger than this file system (or the process's file size limit) allows"}


def existing_folder(path: str | os.PathLike) -> Path:
    """The nearest existing folder above ``path`` (links resolved as the kernel would): where it would be written."""
    folder = physical(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def write_error(path: str | os.PathLike, exc: OSError, *, too_large_hint: str | None = None) -> OutputError:
    """An OSError met while writing ``path``, as an error naming the file, what ran out and how much
    space is left there (the OS's own message, "File too large", names neither)."""
    folder = existing_folder(path)
    try:
        free = f"; {format_size(shutil.disk_usage(folder).free)} is free there"
    except OSError:
        free = ""
    why = _SPACE.get(exc.errno or 0)
    if why is None:
        return OutputError(f"{path}: cannot write it ({exc.strerror or exc}){free}",
                           hint="fix the cause and run again; nothing was left at the output")
    return OutputError(f"{path}: cannot write it: {why} ({exc.strerror}){free}",
                       hint="free some space or write elsewhere" if exc.errno != errno.EFBIG else
                       too_large_hint or "write to another file system, or raise the file size limit (ulimit -f)")


def umask() -> int:
    """The process's umask, read without changing it (Linux's /proc; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700, private) the mode a plain ``open()`` or
    ``mkdir()`` would have given it under the umask: an output renamed into place is the user's, readable
    as their other files are (a team folder, a server reading the model as another user)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def write_file(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``: a link at ``path`` is
    replaced itself, never written through."""
    with staged_file(path, text):
        pass


@contextmanager
def staged_file(path: str | os.PathLike, text: str, recheck: Callable[[], None] | None = None) -> Iterator[None]:
    """``text`` written to a temporary sibling of ``path`` now (a full disk fails here, before the block),
    renamed over ``path`` when the block succeeds and deleted when it fails or is interrupted: a file that
    belongs with another output (tune's scores beside the best merge) appears only with it. ``recheck`` is called
    just before the rename: the path's check at the start again (a user's file that appeared there while the work
    ran was replaced without a word: hp87b c66)."""
    import tempfile

    from .io.writer import remove_stale
    from .scratch import host_tag

    path = physical(path)
    remove_stale(path.parent)  # what a run killed outright (SIGKILL) left staged here
    # named for the process and host, not the file, so that any legal name (up to 255 bytes) can be written and a
    # later run can tell a dead run's leftover (io.writer.remove_stale)
    fd, tmp = tempfile.mkstemp(prefix=f".tiesmerge-file-{host_tag()}-{os.getpid()}-", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            as_if_created(tmp)
        except OSError as exc:
            raise write_error(path, exc) from None
        yield
        if recheck is not None:
            recheck()
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


SEARCH_LOG = "log.jsonl"
SEARCH_STAMPS = ".tiesmerge-report-stamps.json"  # [size, mtime_ns] of the report files as the search wrote them
SEARCH_FILES = {SEARCH_LOG, "results.md", "report.html", SEARCH_STAMPS}


def check_search_dir(directory: str | os.PathLike) -> None:
    """``search --dir``, before the search: new, empty, or a folder a search wrote (its log a regular
    file, not a link, starting with a search log's header). Whether it is the log of the same search is
    checked when the log is opened, before anything is merged."""
    check_walkable(directory, "--dir")
    directory = Path(directory)
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        if os.path.islink(directory):  # a link to a missing folder: its creation failed as "File exists" (hp55 c70)
            raise OutputError(f"{directory}: --dir is a symbolic link to {os.readlink(directory)!r}, which does not "
                              "exist", hint="create that folder, remove the link, or choose another --dir") from None
        return
    except OSError as exc:
        raise OutputError(f"{directory}: cannot check --dir ({exc.strerror or exc})", hint=_write_hint(exc)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{directory}: --dir is not a directory", hint="name a directory for the search's log")
    entries = os.listdir(directory)
    if not entries:
        return
    for name in sorted(SEARCH_FILES - {SEARCH_LOG}):  # replaced at the end: checked now, not after the search
        try:
            mode = os.lstat(directory / name).st_mode
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise OutputError(f"{directory / name}: the search writes its {name} there, but that is "
                              f"{'a directory' if stat.S_ISDIR(mode) else _kind(mode)}",
                              hint="remove it, or choose another --dir")
    log = directory / SEARCH_LOG
    try:
        lst = os.lstat(log)
    except FileNotFoundError:
        lst = None
    if lst is not None and not stat.S_ISREG(lst.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(lst.st_mode) else _kind(lst.st_mode)
        raise OutputError(f"{log}: the search log is {kind}, not a regular file",
                          hint="remove it, or choose another --dir")
    header = b""
    if lst is not None:
        fd = open_regular(log, "the search log", OutputError)
        try:
            header = os.read(fd, 1 << 20).split(b"\n", 1)[0]  # a header of 4 KiB and more: a long evaluator name
            # puts the format marker past its first 4 KiB (hp55 c59: the search's own --dir refused)
        finally:
            os.close(fd)
    if b'"tiesmerge-search/' not in header and not _search_wrote_all(directory, entries):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputError(f"{directory}: --dir exists and holds files that are not a tiesmerge search's ({shown})",
                          hint="choose a new or empty --dir, or the --dir of the same search to resume it")
    _check_report_unchanged(directory)


def _search_wrote_all(directory: Path, entries: Sequence[str]) -> bool:
    """Whether every entry of ``directory`` is a search's own (its report files, their stamps, merged models it wrote
    with -o inside), the stamps readable: a search's folder whose log the user deleted, or whose log's marker is
    damaged, was "--dir holds files that are not a tiesmerge search's (results.md, report.html, ...)", its own (hp79b
    c16, and the cut and deleted logs of hp77b). The log itself is then judged as it is opened (missing: the search
    starts afresh; cut in its header: afresh; damaged: said so)."""
    from .limits import read_json

    try:
        stamped = read_json(directory / SEARCH_STAMPS, "the search's report stamps", error=OutputError)
    except (OutputError, OSError):
        return False
    if not isinstance(stamped, dict):
        return False
    return all(name in SEARCH_FILES or is_output_marker(directory / name / "tiesmerge.json") for name in entries)


def check_report_unchanged(directory: str | os.PathLike) -> None:
    """:func:`_check_report_unchanged` again at the end of a search, right before the report is rewritten: the user
    may have edited results.md while the search ran."""
    if os.path.isdir(directory):
        _check_report_unchanged(Path(directory))


def _is_stamp(value: object) -> bool:
    """A file's stamp as tiesmerge records it: two or three whole numbers, the size first and not negative."""
    return isinstance(value, list) and len(value) in (2, 3) and all(
        type(v) is int and -(1 << 63) <= v < 1 << 63 for v in value) and value[0] >= 0


def _check_report_unchanged(directory: Path) -> None:
    """The report files a search rewrites at its end, as it wrote them: a results.md with the user's notes (changed
    since, by its size or time) stops the run now, not after the search replaced it."""
    from .limits import read_json

    stamps_file = directory / SEARCH_STAMPS
    damaged = missing = False
    if not os.path.lexists(stamps_file):
        stamped: dict = {}
        missing = True  # a record deleted since: said as such, not as the user's edits (hp61b)
    else:
        try:
            stamped = read_json(stamps_file, "the search's report stamps", error=OutputError)
        except OutputError:
            stamped, damaged = {}, True
        damaged = damaged or not isinstance(stamped, dict)
        stamped = stamped if isinstance(stamped, dict) else {}
        # an entry that is no stamp (null, text, 1e400, negatives): damage, not the files' change (hp69b c36)
        damaged = damaged or any(not _is_stamp(v) for k, v in stamped.items() if k in ("results.md", "report.html"))
    changed = []
    for name in ("results.md", "report.html"):
        path = directory / name
        if os.path.islink(path):  # a user's link: never replaced, nor written through (hp48 c39), as -o and --json
            raise OutputError(f"{path}: is a symbolic link (to {os.readlink(path)}), where this search writes its "
                              f"{name} at its end; tiesmerge never replaces a link, nor writes through one",
                              hint="remove the link (its target stays), or choose another --dir")
        if not os.path.lexists(path):
            continue
        if not stamp_holds(stamped.get(name), path):
            changed.append(name)
    if changed and (damaged or missing):  # nothing to tell an edit by (hp55 c38: blamed on the user's files)
        them = "it" if len(changed) == 1 else "them"
        raise OutputError(f"{stamps_file}: the search's record of its report files is "
                          f"{'missing' if missing else 'damaged'}, so whether "
                          f"{' and '.join(changed)} changed since the search wrote {them} cannot be told, and this "
                          f"run would replace {them} at its end",
                          hint=f"keep any changes elsewhere, then delete {'' if missing else SEARCH_STAMPS + ' and '}"
                               f"{' and '.join(changed)}: the search resumes from log.jsonl and writes {them} again")
    if changed:
        them = "it" if len(changed) == 1 else "them"
        raise OutputError(f"{directory}: {', '.join(changed)} changed since the search wrote {them} (edited, or the "
                          "folder was copied: a copy's files are new ones), and this run would replace "
                          f"{them} at its end",
                          hint="keep any changes elsewhere, then delete or rename "
                               f"{' and '.join(changed)}: the search resumes from log.jsonl and writes "
                               f"{them} again")
