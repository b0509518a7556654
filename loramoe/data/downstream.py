"""Built-in downstream tasks, generated procedurally: no world knowledge needed to solve them.

Deterministic by seed and unlimited in size (translation is bounded by its name list). An
item belongs to the test split when a stable hash of its prompt says so, so train and test
never share a prompt, whatever the seeds.
"""

from __future__ import annotations

import gettext
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from loramoe.data.records import EvalRecord, TrainRecord
from loramoe.data.registry import Task, register

TEST_PERCENT = 20
SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "vas", "zel", "qui", "dor", "fen", "ba", "sha",
             "nor", "pel", "ix", "ur", "tam", "wil", "ost", "gra")


@dataclass(frozen=True)
class Item:
    prompt: str
    response: str
    answers: tuple[str, ...]


def in_test_split(task: str, prompt: str) -> bool:
    digest = hashlib.sha256(f"{task}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT


def invented_name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def arithmetic(rng: random.Random) -> Item:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Item(f"Compute {a} {op} {b}. Answer with the number only.", str(result), (str(result),))


def sort_numbers(rng: random.Random) -> Item:
    numbers = rng.sample(range(100), rng.randint(4, 7))
    answer = ", ".join(map(str, sorted(numbers)))
    return Item(f"Sort in ascending order: {', '.join(map(str, numbers))}", answer, (answer,))


def reverse_words(rng: random.Random) -> Item:
    words = [invented_name(rng, 1).lower() for _ in range(rng.randint(3, 6))]
    answer = " ".join(reversed(words))
    return Item(f"Reverse the order of these words: {' '.join(words)}", answer, (answer,))


def count_items(rng: random.Random) -> Item:
    target = rng.choice(SYLLABLES)
    words = [rng.choice(SYLLABLES) for _ in range(rng.randint(5, 12))]
    count = words.count(target)
    return Item(f"How many times does '{target}' appear in: {' '.join(words)}? Answer with a "
                f"number.", str(count), (str(count),))


def reading_comprehension(rng: random.Random) -> Item:
    town, region, mayor = invented_name(rng), invented_name(rng, 3), invented_name(rng)
    founded, people = rng.randint(1200, 1990), rng.randint(300, 90000)
    river = invented_name(rng)
    passage = (f"{town} is a town in the region of {region}. It was founded in {founded} on the "
               f"banks of the {river} river. Today it has {people} inhabitants, and its mayor "
               f"is {mayor}.")
    question, answer = rng.choice([
        (f"When was {town} founded?", str(founded)),
        (f"Who is the mayor of {town}?", mayor),
        (f"How many inhabitants does {town} have?", str(people)),
        (f"On which river was {town} founded?", river),
        (f"In which region is {town}?", region),
    ])
    return Item(f"Read the passage and answer.\n{passage}\nQuestion: {question}", answer,
                (answer,))


NLI_FACTS = [  # (premise, entailed, contradicted)
    ("{p} owns three cats.", "{p} owns pets.", "{p} owns no animals."),
    ("{p} ran a marathon yesterday.", "{p} ran yesterday.", "{p} stayed in bed all of yesterday."),
    ("{p} teaches mathematics at a school.", "{p} has a job.", "{p} has never worked."),
    ("{p} lives in a house by the sea.", "{p} lives near water.", "{p} lives far from any water."),
    ("{p} bought two red apples.", "{p} bought fruit.", "{p} bought nothing."),
]
NEUTRAL = ["{p} likes jazz music.", "{p} has a brother.", "{p} was born in spring.",
           "{p} speaks three languages."]


def nli(rng: random.Random) -> Item:
    person = invented_name(rng)
    premise, entailed, contradicted = rng.choice(NLI_FACTS)
    label = rng.choice(["entailment", "contradiction", "neutral"])
    hypothesis = {"entailment": entailed, "contradiction": contradicted,
                  "neutral": rng.choice(NEUTRAL)}[label]
    prompt = (f"Premise: {premise.format(p=person)}\nHypothesis: {hypothesis.format(p=person)}\n"
              f"Does the premise entail the hypothesis? Answer entailment, contradiction or "
              f"neutral.")
    return Item(prompt, label, (label,))


def summarization(rng: random.Random) -> Item:
    person, company, city = invented_name(rng), invented_name(rng, 3), invented_name(rng)
    role = rng.choice(["engineer", "designer", "chef", "pilot", "teacher", "nurse"])
    year = rng.randint(1990, 2024)
    filler = rng.sample([
        f"The weather in {city} was mild that year.",
        f"{company} also sells furniture.",
        f"Many people in {city} enjoy cycling.",
        "The announcement was made on a Tuesday.",
    ], 2)
    key = f"{person} joined {company} in {city} as a {role} in {year}."
    sentences = [filler[0], key, filler[1]]
    return Item(f"Summarise in one sentence: {' '.join(sentences)}", key, (key,))


LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian"}


@cache
def _country_translations() -> list[tuple[str, str, str]]:
    """(English name, language name, translated name) from pycountry's gettext catalogues."""
    import pycountry

    rows = []
    for code, language in LANGUAGES.items():
        catalogue = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[code])
        for country in pycountry.countries:
            translated = catalogue.gettext(country.name)
            if translated != country.name:
                rows.append((country.name, language, translated))
    return rows


def translation(rng: random.Random) -> Item:
    name, language, translated = rng.choice(_country_translations())
    return Item(f"Translate the country name '{name}' into {language}.", translated,
                (translated,))


TOPICS = {
    "sports": ["match", "goal", "coach", "league", "tournament", "player"],
    "science": ["experiment", "molecule", "telescope", "laboratory", "theory", "cell"],
    "business": ["market", "profit", "merger", "shares", "investor", "revenue"],
    "politics": ["election", "parliament", "minister", "vote", "policy", "senate"],
}


def classification(rng: random.Random) -> Item:
    topic = rng.choice(sorted(TOPICS))
    words = rng.sample(TOPICS[topic], 2)
    name = invented_name(rng)
    text = f"{name} talked about the {words[0]} and the {words[1]} on Monday."
    prompt = f"Classify the topic of this text as sports, science, business or politics: {text}"
    return Item(prompt, topic, (topic,))


@dataclass(frozen=True)
class Generator:
    name: str
    make: Callable[[random.Random], Item]
    metric: str


GENERATORS = [
    Generator("arithmetic", arithmetic, "exact_match"),
    Generator("sort_numbers", sort_numbers, "exact_match"),
    Generator("reverse_words", reverse_words, "exact_match"),
    Generator("count_items", count_items, "exact_match"),
    Generator("reading_comprehension", reading_comprehension, "f1"),
    Generator("nli", nli, "accuracy"),
    Generator("summarization", summarization, "rouge_l"),
    Generator("translation", translation, "chrf"),
    Generator("topic_classification", classification, "accuracy"),
]


def generate(gen: Generator, split: str, n: int, seed: int) -> list[Item]:
    """Up to n distinct items of the split; stops when the space looks exhausted."""
    rng = random.Random(f"{gen.name}:{split}:{seed}")
    want_test = split == "test"
    items: dict[str, Item] = {}
    misses = 0
    while len(items) < n and misses < 50 * n + 1000:
        item = gen.make(rng)
        if in_test_split(gen.name, item.prompt) != want_test or item.prompt in items:
            misses += 1
            continue
        items[item.prompt] = item
    return list(items.values())


def _builders(gen: Generator):
    def build_train(n: int, seed: int) -> list[TrainRecord]:
        return [TrainRecord(f"{gen.name}-train-{i}", gen.name, "downstream", it.prompt,
                            it.response) for i, it in enumerate(generate(gen, "train", n, seed))]

    def build_eval(n: int, seed: int) -> list[EvalRecord]:
        return [EvalRecord(f"{gen.name}-test-{i}", gen.name, "downstream", it.prompt,
                           list(it.answers), gen.metric)
                for i, it in enumerate(generate(gen, "test", n, seed))]

    return build_train, build_eval


for _gen in GENERATORS:
    _train, _eval = _builders(_gen)
    register(Task(name=_gen.name, task_type="downstream", metric=_gen.metric, source="builtin",
                  build_train=_train, build_eval=_eval, description=f"procedural {_gen.name}"))
