"""The cost measurement: every method's row on the same samples, each component set extracted once."""

import torch

from tdabench.costs import ReduceTimes, TimedExtraction, measure_setting
from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.sections import CostsConfig
from tdabench.selection import SelectionTable

from helpers import tiny_llama
from test_streaming import examples


class CountedExtraction(TimedExtraction):
    """The real timed extraction, recording which component sets it was asked for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, names):
        self.asked.append(tuple(names))
        return super().__call__(names)


def _selection(names: list[str], greedy_size: int = 2) -> SelectionTable:
    """Split 0's choices: single names[2], greedy names[:greedy_size], budgets 0.1 and 0.5."""
    rows = [{"split": 0, "kind": "single", "component": c, "chosen": i == 2} for i, c in enumerate(names)]
    rows += [
        {"split": 0, "kind": "greedy", "component": c, "chosen": i == greedy_size - 1, "step": i + 1}
        for i, c in enumerate(names)
    ]
    # budget 0.5 keeps the greedy set itself; budget 0.1 a prefix of one
    rows += [
        {"split": 0, "kind": "budget", "component": c, "chosen": i == kept - 1, "step": i + 1, "budget": budget}
        for budget, kept in ((0.1, 1), (0.5, 2))
        for i, c in enumerate(names[:kept])
    ]
    return SelectionTable.from_rows(rows, "s", "mrr")


def test_each_component_set_is_extracted_once_and_shared_by_the_methods_that_need_it():
    torch.manual_seed(0)
    extraction = Extraction(tiny_llama(), ExtractionConfig(("q", "v", "down"), 4, None, 0, None))
    names = extraction.names
    greedy = names[:2]
    selection = _selection(names)
    timed = CountedExtraction(extraction, examples(6, 1), 0)
    cfg = CostsConfig(("sjlt", "select_then_project"), (2, 4), 1, "sjlt")
    got = measure_setting("s", timed, selection, cfg, 6)

    assert sorted(timed.asked) == sorted({tuple(names), tuple(greedy), (names[2],), (names[0],)})  # once each
    by = {(r["method"], r["variant"], r["k"]): r for r in got}
    assert set(by) == {
        ("full", None, None),
        ("best_single", None, None),
        ("greedy", None, None),
        ("greedy_budget", "budget 0.1", None),
        ("greedy_budget", "budget 0.5", None),
        ("projection", "sjlt", 2),
        ("projection", "sjlt", 4),
        ("select_then_project", "select_then_project", 2),
        ("select_then_project", "select_then_project", 4),
    }
    greedy_s = by[("greedy", None, None)]["extract_seconds"]
    assert greedy_s > 0
    for key in [
        ("greedy_budget", "budget 0.5", None),
        *[("select_then_project", "select_then_project", k) for k in (2, 4)],
    ]:
        assert by[key]["extract_seconds"] == greedy_s  # the greedy set's one measurement
    for key in [("projection", "sjlt", 2), ("projection", "sjlt", 4)]:
        assert by[key]["extract_seconds"] == by[("full", None, None)]["extract_seconds"]
        assert by[key]["reduce_seconds"] > 0


def test_projections_are_timed_once_for_settings_with_the_same_samples_and_components():
    torch.manual_seed(0)
    extraction = Extraction(tiny_llama(), ExtractionConfig(("q", "v", "down"), 4, None, 0, None))
    names = extraction.names
    cfg = CostsConfig(("sjlt", "blockwise", "select_then_project"), (2, 4), 1, "sjlt")
    reduce = ReduceTimes()
    first = measure_setting("a", TimedExtraction(extraction, examples(6, 1), 0), _selection(names), cfg, 6, reduce)
    # another setting: other samples, another greedy set; then one with fewer samples
    second = measure_setting("b", TimedExtraction(extraction, examples(6, 2), 0), _selection(names, 1), cfg, 6, reduce)
    fewer = measure_setting("c", TimedExtraction(extraction, examples(4, 3), 0), _selection(names), cfg, 4, reduce)

    def reduce_s(rows, method):
        return {(r["variant"], r["k"]): r["reduce_seconds"] for r in rows if r["method"] == method}

    assert reduce_s(second, "projection") == reduce_s(first, "projection")  # the same full gradient's
    assert all(s > 0 for s in reduce_s(first, "projection").values())
    # select-then-project over another greedy set, or any projection of fewer samples: timed anew
    assert set(reduce_s(second, "select_then_project").values()).isdisjoint(
        reduce_s(first, "select_then_project").values()
    )
    assert set(reduce_s(fewer, "projection").values()).isdisjoint(reduce_s(first, "projection").values())
    # the fewer samples' select-then-project has the first setting's greedy set: timed anew, too
    assert set(reduce_s(fewer, "select_then_project").values()).isdisjoint(
        reduce_s(first, "select_then_project").values()
    )
