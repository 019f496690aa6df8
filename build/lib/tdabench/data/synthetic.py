"""Seeded synthetic planted-facts benchmark (offline default).

Fictional entities carry facts of several relation types (birthplace, employer, ...). Every fact is
stated by exactly one training example. *Background* facts (a few per entity) are generated first,
from the seed alone; *planted* facts are then added on (entity, relation) pairs the background
left free, from their own random stream, so changing the planted settings never changes the
background (and never reruns pre-training on it). Each planted fact gets a paraphrased query
whose question and answer use templates that never occur in training, with held-out synonyms
for the relation words. Background facts share entities and relations with the planted ones
(hard negatives), every entity has several facts (its name alone does not identify the source),
and answer values come from pools shared by all entities.

Tables: background / train rows: id, prompt, response, role (planted|background), entity,
relation, value; query rows: id, source_id, setting, prompt, response, entity, relation, value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tor",
    "vel",
    "sa",
    "dun",
    "bri",
    "fen",
    "gar",
    "hol",
    "is",
    "jun",
    "mor",
    "nal",
    "pel",
    "quin",
    "ros",
    "sil",
    "tam",
    "ul",
    "vor",
    "wen",
    "yar",
    "zel",
    "ath",
    "bel",
    "cor",
    "dra",
    "eth",
    "fal",
    "gri",
    "hel",
    "ith",
    "kor",
    "lun",
    "mar",
    "nor",
    "oth",
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
        (
            "Lisbon",
            "Oslo",
            "Quito",
            "Nairobi",
            "Hanoi",
            "Lima",
            "Dublin",
            "Porto",
            "Tunis",
            "Riga",
            "Accra",
            "Perth",
            "Bergen",
            "Cusco",
            "Malmo",
            "Tallinn",
        ),
        (
            "Where was {e} born?",
            "In which city was {e} born?",
            "What is the birthplace of {e}?",
            "Which city is the birthplace of {e}?",
            "Tell me where {e} was born.",
            "Name the city where {e} was born.",
        ),
        (
            "{e} was born in {v}.",
            "The birthplace of {e} is {v}.",
            "{e} was born in the city of {v}.",
            "{v} is where {e} was born.",
            "The city where {e} was born is {v}.",
            "{e} is a native of {v}.",
        ),
        (
            "Which town does {e} originally hail from?",
            "What is the hometown of {e}?",
            "From what place does {e} originate?",
        ),
        ("{e} originally hails from {v}.", "The hometown of {e} is {v}.", "{e} originates from {v}."),
    ),
    Relation(
        "employer",
        (
            "Norbex",
            "Quillon",
            "Astera",
            "Veltrix",
            "Omnira",
            "Brightwell",
            "Calderon",
            "Zephyra",
            "Lumora",
            "Pellico",
            "Tessaro",
            "Hadley",
        ),
        (
            "Which company does {e} work for?",
            "Who employs {e}?",
            "Where does {e} work?",
            "What company employs {e}?",
            "Name the employer of {e}.",
            "For whom does {e} work?",
        ),
        (
            "{e} works for {v}.",
            "{e} is employed by {v}.",
            "The employer of {e} is {v}.",
            "{v} employs {e}.",
            "{e} works at {v}.",
            "The company {e} works for is {v}.",
        ),
        (
            "At which firm does {e} hold a job?",
            "Which organisation pays the salary of {e}?",
            "Which business has {e} on its payroll?",
        ),
        ("{e} holds a job at the firm {v}.", "The salary of {e} is paid by {v}.", "{v} has {e} on its payroll."),
    ),
    Relation(
        "birth_year",
        tuple(str(y) for y in range(1931, 1999, 3)),
        (
            "In which year was {e} born?",
            "What year was {e} born in?",
            "When was {e} born?",
            "What is the birth year of {e}?",
            "Tell me the year {e} was born.",
            "Name the year of birth of {e}.",
        ),
        (
            "{e} was born in the year {v}.",
            "The birth year of {e} is {v}.",
            "{e} was born in {v}.",
            "{v} is the year {e} was born.",
            "The year of birth of {e} is {v}.",
            "{e} was born back in {v}.",
        ),
        (
            "In what year did {e} come into the world?",
            "How far back does the life of {e} go?",
            "What year marks the arrival of {e}?",
        ),
        ("{e} came into the world in {v}.", "The life of {e} began in {v}.", "{e} arrived in {v}."),
    ),
    Relation(
        "instrument",
        (
            "cello",
            "violin",
            "flute",
            "oboe",
            "harp",
            "piano",
            "banjo",
            "trumpet",
            "clarinet",
            "guitar",
            "accordion",
            "drums",
        ),
        (
            "Which instrument does {e} play?",
            "What instrument does {e} play?",
            "What does {e} play in the band?",
            "Name the instrument of {e}.",
            "Which instrument is played by {e}?",
            "What is the instrument of {e}?",
        ),
        (
            "{e} plays the {v}.",
            "The instrument of {e} is the {v}.",
            "In the band, {e} plays the {v}.",
            "The {v} is played by {e}.",
            "{e} plays the {v} in the band.",
            "The {v} is the instrument of {e}.",
        ),
        (
            "What musical instrument is {e} skilled at?",
            "On which instrument does {e} perform?",
            "Which instrument has {e} mastered?",
        ),
        ("{e} is skilled at the {v}.", "{e} performs on the {v}.", "{e} has mastered the {v}."),
    ),
    Relation(
        "pet",
        (
            "parrot",
            "tortoise",
            "ferret",
            "beagle",
            "hamster",
            "iguana",
            "goldfish",
            "rabbit",
            "poodle",
            "canary",
            "gecko",
            "kitten",
        ),
        (
            "What pet does {e} have?",
            "Which animal does {e} keep as a pet?",
            "What is the pet of {e}?",
            "Name the pet of {e}.",
            "What kind of pet does {e} own?",
            "Which pet belongs to {e}?",
        ),
        (
            "{e} has a pet {v}.",
            "The pet of {e} is a {v}.",
            "{e} keeps a {v} as a pet.",
            "{e} owns a pet {v}.",
            "A pet {v} belongs to {e}.",
            "The pet that {e} has is a {v}.",
        ),
        (
            "Which creature shares a home with {e}?",
            "What animal lives with {e}?",
            "Which companion animal does {e} look after?",
        ),
        ("A {v} shares a home with {e}.", "A {v} lives with {e}.", "{e} looks after a {v}."),
    ),
    Relation(
        "language",
        (
            "Basque",
            "Welsh",
            "Tagalog",
            "Swahili",
            "Finnish",
            "Icelandic",
            "Maltese",
            "Catalan",
            "Estonian",
            "Amharic",
            "Gaelic",
            "Latvian",
        ),
        (
            "Which language does {e} speak?",
            "What language does {e} speak at home?",
            "What is the language of {e}?",
            "Name the language {e} speaks.",
            "In which language does {e} talk?",
            "What language is spoken by {e}?",
        ),
        (
            "{e} speaks {v}.",
            "At home, {e} speaks {v}.",
            "The language of {e} is {v}.",
            "{v} is the language {e} speaks.",
            "{e} talks in {v}.",
            "{v} is spoken by {e}.",
        ),
        (
            "In which tongue does {e} converse?",
            "What is the mother tongue of {e}?",
            "Which vernacular does {e} use daily?",
        ),
        ("{e} converses in {v}.", "The mother tongue of {e} is {v}.", "{e} uses {v} daily."),
    ),
    Relation(
        "sport",
        (
            "rugby",
            "fencing",
            "rowing",
            "curling",
            "squash",
            "archery",
            "judo",
            "sailing",
            "polo",
            "handball",
            "cricket",
            "lacrosse",
        ),
        (
            "Which sport does {e} play?",
            "What sport does {e} practise?",
            "What is the sport of {e}?",
            "Name the sport of {e}.",
            "Which sport is practised by {e}?",
            "What sport does {e} do?",
        ),
        (
            "{e} plays {v}.",
            "The sport of {e} is {v}.",
            "{e} practises {v}.",
            "{v} is the sport of {e}.",
            "{e} does {v} every week.",
            "{v} is practised by {e}.",
        ),
        (
            "Which athletic pursuit does {e} compete in?",
            "What game does {e} train for?",
            "Which discipline does {e} excel in?",
        ),
        ("{e} competes in {v}.", "{e} trains for {v}.", "{e} excels in {v}."),
    ),
    Relation(
        "color",
        (
            "crimson",
            "teal",
            "amber",
            "violet",
            "ochre",
            "indigo",
            "olive",
            "scarlet",
            "cobalt",
            "maroon",
            "turquoise",
            "saffron",
        ),
        (
            "What is the favourite colour of {e}?",
            "Which colour does {e} like best?",
            "What colour does {e} prefer?",
            "Name the favourite colour of {e}.",
            "Which colour is the favourite of {e}?",
            "What colour does {e} love most?",
        ),
        (
            "The favourite colour of {e} is {v}.",
            "{e} likes {v} best.",
            "{e} prefers the colour {v}.",
            "{v} is the favourite colour of {e}.",
            "{e} loves the colour {v} most.",
            "Of all colours, {e} likes {v} best.",
        ),
        (
            "Which hue does {e} find most appealing?",
            "What shade is {e} fondest of?",
            "Which tint attracts {e} the most?",
        ),
        (
            "{e} finds {v} the most appealing hue.",
            "{e} is fondest of the shade {v}.",
            "The tint that attracts {e} is {v}.",
        ),
    ),
)


@dataclass(frozen=True)
class SyntheticConfig:
    n_entities: int = 100
    background_facts_per_entity: int = 2
    planted_facts: int = 200  # spread over the (entity, relation) pairs the background left free
    train_templates: int = 6  # training templates per pool (question / answer) and relation, at most 6
    query_templates: int = 3  # held-out query templates per pool and relation, at most 3
    seed: int = 0


def entity_names(n: int, rng: np.random.Generator) -> list[str]:
    """`n` unique made-up two-part names ("Velkora Tamdun"), free of answer words."""
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        parts = ["".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize() for _ in range(2)]
        name = " ".join(parts)
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _example(rng, rel: Relation, entity: str, value: str, n_templates: int) -> tuple[str, str]:
    return (
        str(rng.choice(rel.train_questions[:n_templates])).format(e=entity),
        str(rng.choice(rel.train_answers[:n_templates])).format(e=entity, v=value),
    )


def generate_background(cfg: SyntheticConfig) -> pl.DataFrame:
    """Background facts of every entity; depends only on the background settings and the seed."""
    if cfg.background_facts_per_entity > len(RELATIONS):
        raise ValueError(
            f"background_facts_per_entity={cfg.background_facts_per_entity} exceeds the {len(RELATIONS)} relation types"
        )
    rng = np.random.default_rng([cfg.seed, 0])
    names = entity_names(cfg.n_entities, rng)
    rows = []
    for name in names:
        for r in rng.choice(len(RELATIONS), size=cfg.background_facts_per_entity, replace=False):
            rel = RELATIONS[int(r)]
            value = str(rng.choice(rel.values))
            prompt, response = _example(rng, rel, name, value, cfg.train_templates)
            rows.append(
                {
                    "prompt": prompt,
                    "response": response,
                    "role": "background",
                    "entity": name,
                    "relation": rel.name,
                    "value": value,
                }
            )
    order = rng.permutation(len(rows))  # interleave entities so ids carry no structure
    table = pl.DataFrame([rows[i] for i in order])
    return table.with_columns(pl.format("b{}", pl.int_range(pl.len()).cast(pl.Utf8).str.zfill(5)).alias("id")).select(
        "id", "prompt", "response", "role", "entity", "relation", "value"
    )


def generate(cfg: SyntheticConfig, background: pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, queries): the background plus planted facts, and a paraphrased query per planted fact."""
    background = generate_background(cfg) if background is None else background
    rng = np.random.default_rng([cfg.seed, 1])  # the planted stream, independent of the background's
    taken = set(zip(background["entity"], background["relation"]))
    entities = list(dict.fromkeys(background["entity"].to_list()))
    free = [(e, rel) for e in entities for rel in RELATIONS if (e, rel.name) not in taken]
    if cfg.planted_facts > len(free):
        raise ValueError(
            f"planted_facts={cfg.planted_facts}: only {len(free)} (entity, relation) pairs are free; "
            "use more entities or fewer background facts per entity"
        )
    picks = rng.choice(len(free), size=cfg.planted_facts, replace=False)
    planted, queries = [], []
    for i, j in enumerate(picks):
        entity, rel = free[int(j)]
        value = str(rng.choice(rel.values))
        prompt, response = _example(rng, rel, entity, value, cfg.train_templates)
        pid = f"p{i:05d}"
        planted.append(
            {
                "id": pid,
                "prompt": prompt,
                "response": response,
                "role": "planted",
                "entity": entity,
                "relation": rel.name,
                "value": value,
            }
        )
        queries.append(
            {
                "id": f"q{i:05d}",
                "source_id": pid,
                "setting": "paraphrased",
                "prompt": str(rng.choice(rel.query_questions[: cfg.query_templates])).format(e=entity),
                "response": str(rng.choice(rel.query_answers[: cfg.query_templates])).format(e=entity, v=value),
                "entity": entity,
                "relation": rel.name,
                "value": value,
            }
        )
    train = pl.concat([background, pl.DataFrame(planted, schema=background.schema)])
    return train, pl.DataFrame(queries)


def vocabulary_corpus() -> list[str]:
    """Every template of every pool and every answer value: the general corpus the default
    tokenizer is trained on besides the training texts (as a real LM's tokenizer is trained on far
    more than its fine-tuning data), so held-out query words are whole tokens rather than byte
    fragments. The model itself never trains on these texts."""
    out = []
    for rel in RELATIONS:
        templates = rel.train_questions + rel.train_answers + rel.query_questions + rel.query_answers
        out += [t.replace("{e}", "").replace("{v}", "") for t in templates]
        out += list(rel.values)
    return out
