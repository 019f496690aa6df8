import re

import polars as pl

from tdabench.data.synthetic import RELATIONS, SyntheticConfig, generate


def template_regex(template):
    """A template as a full-match regex over rendered text ({e}, {v} -> anything)."""
    parts = re.split(r"(\{e\}|\{v\})", template)
    return re.compile("".join(".+" if p in ("{e}", "{v}") else re.escape(p) for p in parts))


def test_same_seed_same_tables_other_seed_other_tables():
    a = generate(SyntheticConfig(n_entities=20, seed=1))
    b = generate(SyntheticConfig(n_entities=20, seed=1))
    c = generate(SyntheticConfig(n_entities=20, seed=2))
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert not a[0].equals(c[0])


def test_every_fact_is_stated_by_exactly_one_training_example():
    train, queries = generate(SyntheticConfig(n_entities=30, facts_per_entity=5))
    assert train.height == 150
    assert train.select("entity", "relation").is_unique().all()
    assert train["id"].is_unique().all()
    # Each entity has several facts, so its name alone points at several examples.
    assert train.group_by("entity").len()["len"].min() == 5


def test_queries_point_at_planted_examples_with_the_same_fact():
    train, queries = generate(SyntheticConfig(n_entities=30, planted_fraction=0.4))
    planted = train.filter(pl.col("role") == "planted")
    assert queries.height == planted.height == round(0.4 * train.height)
    joined = queries.join(train, left_on="source_id", right_on="id", suffix="_src")
    assert joined.height == queries.height
    assert (joined["role"] == "planted").all()
    assert (joined["value"] == joined["value_src"]).all() and (joined["entity"] == joined["entity_src"]).all()
    assert all(v in r for v, r in zip(queries["value"], queries["response"]))
    assert set(queries["setting"]) == {"paraphrased"}


def test_no_query_template_occurs_in_training():
    train, queries = generate(SyntheticConfig(n_entities=60))
    train_texts = train["prompt"].to_list() + train["response"].to_list()
    for rel in RELATIONS:
        for template in rel.query_questions + rel.query_answers:
            pattern = template_regex(template)
            assert not any(pattern.fullmatch(t) for t in train_texts), template
        # Held-out wording: each query template has a word no training template of any relation uses.
        train_words = {w for r in RELATIONS for t in r.train_questions + r.train_answers
                       for w in re.findall(r"[a-z]+", t.lower())}
        for template in rel.query_questions + rel.query_answers:
            assert set(re.findall(r"[a-z]+", template.lower())) - train_words - {"e", "v"}, template


def test_hard_negatives_share_entity_or_relation():
    train, _ = generate(SyntheticConfig(n_entities=30))
    planted = train.filter(pl.col("role") == "planted")
    background = train.filter(pl.col("role") == "background")
    same_entity = planted.join(background, on="entity").height
    same_relation = planted.join(background, on="relation").height
    assert same_entity > 0 and same_relation > 0
