"""Seeded synthetic planted-facts benchmark (offline default).

Fictional entities carry facts of several relation types (birthplace, employer, ...). Every fact is
stated by exactly one training example, so that example is the only place the model can learn it.
A share of the facts is *planted*: each gets a paraphrased query whose question and answer use
templates that never occur in training. The other facts are background examples; they share
entities and relations with the planted ones (hard negatives), and every entity has several facts,
so an entity's name alone does not identify the source example. Answer values come from pools
shared by all entities.

Train rows: id, prompt, response, role (planted|background), entity, relation, value.
Query rows: id, source_id, setting, prompt, response, entity, relation, value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

SYLLABLES = [
    "ka", "lo", "mi", "ren", "tor", "vel", "sa", "dun", "bri", "fen", "gar", "hol", "is", "jun",
    "mor", "nal", "pel", "quin", "ros", "sil", "tam", "ul", "vor", "wen", "yar", "zel", "ath",
    "bel", "cor", "dra", "eth", "fal", "gri", "hel", "ith", "kor", "lun", "mar", "nor", "oth",
]


@dataclass(frozen=True)
class Relation:
    name: str
    values: tuple[str, ...]
    train_questions: tuple[str, ...]
    train_answers: tuple[str, ...]
    query_questions: tuple[str, ...]  # never used in training (held-out wording and synonyms)
    query_answers: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        ("Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Lima", "Dublin", "Porto", "Tunis",
         "Riga", "Accra", "Perth", "Bergen", "Cusco", "Malmo", "Tallinn"),
        ("Where was {e} born?", "In which city was {e} born?", "What is the birthplace of {e}?"),
        ("{e} was born in {v}.", "The birthplace of {e} is {v}.", "{e} was born in the city of {v}."),
        ("Which town does {e} originally hail from?", "What is the hometown of {e}?"),
        ("{e} originally hails from {v}.", "The hometown of {e} is {v}."),
    ),
    Relation(
        "employer",
        ("Norbex", "Quillon", "Astera", "Veltrix", "Omnira", "Brightwell", "Calderon", "Zephyra",
         "Lumora", "Pellico", "Tessaro", "Hadley"),
        ("Which company does {e} work for?", "Who employs {e}?", "Where does {e} work?"),
        ("{e} works for {v}.", "{e} is employed by {v}.", "The employer of {e} is {v}."),
        ("At which firm does {e} hold a job?", "Which organisation pays the salary of {e}?"),
        ("{e} holds a job at the firm {v}.", "The salary of {e} is paid by {v}."),
    ),
    Relation(
        "birth_year",
        tuple(str(y) for y in range(1931, 1999, 3)),
        ("In which year was {e} born?", "What year was {e} born in?", "When was {e} born?"),
        ("{e} was born in the year {v}.", "The birth year of {e} is {v}.", "{e} was born in {v}."),
        ("In what year did {e} come into the world?", "How far back does the life of {e} go?"),
        ("{e} came into the world in {v}.", "The life of {e} began in {v}."),
    ),
    Relation(
        "instrument",
        ("cello", "violin", "flute", "oboe", "harp", "piano", "banjo", "trumpet", "clarinet",
         "guitar", "accordion", "drums"),
        ("Which instrument does {e} play?", "What instrument does {e} play?", "What does {e} play in the band?"),
        ("{e} plays the {v}.", "The instrument of {e} is the {v}.", "In the band, {e} plays the {v}."),
        ("What musical instrument is {e} skilled at?", "On which instrument does {e} perform?"),
        ("{e} is skilled at the {v}.", "{e} performs on the {v}."),
    ),
    Relation(
        "pet",
        ("parrot", "tortoise", "ferret", "beagle", "hamster", "iguana", "goldfish", "rabbit",
         "poodle", "canary", "gecko", "kitten"),
        ("What pet does {e} have?", "Which animal does {e} keep as a pet?", "What is the pet of {e}?"),
        ("{e} has a pet {v}.", "The pet of {e} is a {v}.", "{e} keeps a {v} as a pet."),
        ("Which creature shares a home with {e}?", "What animal lives with {e}?"),
        ("A {v} shares a home with {e}.", "A {v} lives with {e}."),
    ),
    Relation(
        "language",
        ("Basque", "Welsh", "Tagalog", "Swahili", "Finnish", "Icelandic", "Maltese", "Catalan",
         "Estonian", "Amharic", "Gaelic", "Latvian"),
        ("Which language does {e} speak?", "What language does {e} speak at home?", "What is the language of {e}?"),
        ("{e} speaks {v}.", "At home, {e} speaks {v}.", "The language of {e} is {v}."),
        ("In which tongue does {e} converse?", "What is the mother tongue of {e}?"),
        ("{e} converses in {v}.", "The mother tongue of {e} is {v}."),
    ),
    Relation(
        "sport",
        ("rugby", "fencing", "rowing", "curling", "squash", "archery", "judo", "sailing", "polo",
         "handball", "cricket", "lacrosse"),
        ("Which sport does {e} play?", "What sport does {e} practise?", "What is the sport of {e}?"),
        ("{e} plays {v}.", "The sport of {e} is {v}.", "{e} practises {v}."),
        ("Which athletic pursuit does {e} compete in?", "What game does {e} train for?"),
        ("{e} competes in {v}.", "{e} trains for {v}."),
    ),
    Relation(
        "color",
        ("crimson", "teal", "amber", "violet", "ochre", "indigo", "olive", "scarlet", "cobalt",
         "maroon", "turquoise", "saffron"),
        ("What is the favourite colour of {e}?", "Which colour does {e} like best?", "What colour does {e} prefer?"),
        ("The favourite colour of {e} is {v}.", "{e} likes {v} best.", "{e} prefers the colour {v}."),
        ("Which hue does {e} find most appealing?", "What shade is {e} fondest of?"),
        ("{e} finds {v} the most appealing hue.", "{e} is fondest of the shade {v}."),
    ),
)


@dataclass(frozen=True)
class SyntheticConfig:
    n_entities: int = 100
    facts_per_entity: int = 4
    planted_fraction: float = 0.5
    seed: int = 0


def entity_names(n: int, rng: np.random.Generator) -> list[str]:
    """`n` unique made-up two-part names ("Velkora Tamdun"), free of answer words."""
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        parts = [
            "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
            for _ in range(2)
        ]
        name = " ".join(parts)
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def generate(cfg: SyntheticConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Build (train, queries) tables. Same config, same tables."""
    if cfg.facts_per_entity > len(RELATIONS):
        raise ValueError(
            f"facts_per_entity={cfg.facts_per_entity} exceeds the {len(RELATIONS)} relation types"
        )
    rng = np.random.default_rng(cfg.seed)
    names = entity_names(cfg.n_entities, rng)

    facts = []  # (entity, relation)
    for name in names:
        for r in rng.choice(len(RELATIONS), size=cfg.facts_per_entity, replace=False):
            facts.append((name, RELATIONS[int(r)]))
    order = rng.permutation(len(facts))  # interleave entities so ids carry no structure
    facts = [facts[i] for i in order]
    n_planted = max(1, round(cfg.planted_fraction * len(facts)))
    planted = set(rng.choice(len(facts), size=n_planted, replace=False).tolist())

    train_rows, query_rows = [], []
    for i, (entity, rel) in enumerate(facts):
        value = str(rng.choice(rel.values))
        tid = f"t{i:05d}"
        train_rows.append({
            "id": tid,
            "prompt": str(rng.choice(rel.train_questions)).format(e=entity),
            "response": str(rng.choice(rel.train_answers)).format(e=entity, v=value),
            "role": "planted" if i in planted else "background",
            "entity": entity,
            "relation": rel.name,
            "value": value,
        })
        if i in planted:
            query_rows.append({
                "id": f"q{len(query_rows):05d}",
                "source_id": tid,
                "setting": "paraphrased",
                "prompt": str(rng.choice(rel.query_questions)).format(e=entity),
                "response": str(rng.choice(rel.query_answers)).format(e=entity, v=value),
                "entity": entity,
                "relation": rel.name,
                "value": value,
            })
    return pl.DataFrame(train_rows), pl.DataFrame(query_rows)
