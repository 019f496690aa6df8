import re

import polars as pl
import pytest

from tdabench.data.synthetic import RELATIONS, SyntheticConfig, generate, generate_background


def template_regex(template):
    """A template as a full-match regex over rendered text ({e}, {v} -> anything)."""
    parts = re.split(r"(\{e\}|\{v\})", template)
    return re.compile("".join(".+" if p in ("{e}", "{v}") else re.escape(p) for p in parts))


def test_same_seed_same_tables_other_seed_other_tables():
    cfg = SyntheticConfig(n_entities=20, planted_facts=30, seed=1)
    a, b = generate(cfg), generate(cfg)
    c = generate(SyntheticConfig(n_entities=20, planted_facts=30, seed=2))
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert not a[0].equals(c[0])


def test_background_does_not_depend_on_planted_settings():
    base = SyntheticConfig(n_entities=30, planted_facts=40)
    other = SyntheticConfig(n_entities=30, planted_facts=70, query_templates=2)
    assert generate_background(base).equals(generate_background(other))
    train_a, _ = generate(base)
    train_b, _ = generate(other)
    assert train_a.filter(pl.col("role") == "background").equals(train_b.filter(pl.col("role") == "background"))
    assert not train_a.equals(train_b)


def test_every_fact_is_stated_by_exactly_one_training_example():
    train, queries = generate(SyntheticConfig(n_entities=30, background_facts_per_entity=3, planted_facts=60))
    assert train.height == 30 * 3 + 60
    assert train.select("entity", "relation").is_unique().all()
    assert train["id"].is_unique().all()
    # Every entity keeps all its background facts, so its name alone points at several examples.
    assert train.group_by("entity").len()["len"].min() >= 3


def test_queries_point_at_planted_examples_with_the_same_fact():
    train, queries = generate(SyntheticConfig(n_entities=30, planted_facts=50))
    planted = train.filter(pl.col("role") == "planted")
    assert queries.height == planted.height == 50
    joined = queries.join(train, left_on="source_id", right_on="id", suffix="_src")
    assert joined.height == queries.height
    assert (joined["role"] == "planted").all()
    assert (joined["value"] == joined["value_src"]).all() and (joined["entity"] == joined["entity_src"]).all()
    assert all(v in r for v, r in zip(queries["value"], queries["response"]))
    assert set(queries["setting"]) == {"paraphrased"}


def test_too_many_planted_facts_is_a_clear_error():
    with pytest.raises(ValueError, match="planted_facts=200: only 180"):
        generate(SyntheticConfig(n_entities=30, planted_facts=200))


def test_no_query_template_occurs_in_training():
    train, queries = generate(SyntheticConfig(n_entities=100, planted_facts=300))
    train_texts = train["prompt"].to_list() + train["response"].to_list()
    # No rendered query prompt or response occurs in (or as part of) any training text ...
    for text in queries["prompt"].to_list() + queries["response"].to_list():
        assert not any(text in t for t in train_texts), text
    for rel in RELATIONS:
        for template in rel.query_questions + rel.query_answers:
            pattern = template_regex(template)
            assert not any(pattern.fullmatch(t) for t in train_texts), template
            # ... nor does any multi-word literal piece of a query template.
            for piece in re.split(r"\{e\}|\{v\}", template):
                if len(piece.split()) >= 2:
                    assert not any(piece.strip() in t for t in train_texts), (template, piece)
        # Held-out wording: each query template has a word no training template of any relation uses.
        train_words = {
            w for r in RELATIONS for t in r.train_questions + r.train_answers for w in re.findall(r"[a-z]+", t.lower())
        }
        for template in rel.query_questions + rel.query_answers:
            assert set(re.findall(r"[a-z]+", template.lower())) - train_words - {"e", "v"}, template


def test_hard_negatives_share_entity_or_relation():
    train, _ = generate(SyntheticConfig(n_entities=30, planted_facts=60))
    planted = train.filter(pl.col("role") == "planted")
    background = train.filter(pl.col("role") == "background")
    same_entity = planted.join(background, on="entity").height
    same_relation = planted.join(background, on="relation").height
    assert same_entity > 0 and same_relation > 0
