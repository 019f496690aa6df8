"""The cost measurement: every method's row on the same samples, each component set extracted once."""

import torch

from tdabench.costs import TimedExtraction, measure_setting
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


def test_each_component_set_is_extracted_once_and_shared_by_the_methods_that_need_it():
    torch.manual_seed(0)
    extraction = Extraction(tiny_llama(), ExtractionConfig(("q", "v", "down"), 4, None, 0, None))
    names = extraction.names
    greedy = names[:2]
    rows = [{"split": 0, "kind": "single", "component": c, "chosen": i == 2} for i, c in enumerate(names)]
    rows += [
        {"split": 0, "kind": "greedy", "component": c, "chosen": i == 1, "step": i + 1} for i, c in enumerate(names)
    ]
    # budget 0.5 keeps the greedy set itself; budget 0.1 a prefix of one
    rows += [
        {"split": 0, "kind": "budget", "component": c, "chosen": i == kept - 1, "step": i + 1, "budget": budget}
        for budget, kept in ((0.1, 1), (0.5, 2))
        for i, c in enumerate(names[:kept])
    ]
    selection = SelectionTable.from_rows(rows, "s", "mrr")
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
