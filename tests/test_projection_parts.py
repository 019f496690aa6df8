"""Select-then-project summed from the blocks projection_stream keeps, against the projection of
the selected components computed straight from the model (the pass the parts replace)."""

import numpy as np
import pytest
from test_projection_stream import COMPONENTS, model

from tdabench.extraction import Extraction, ExtractionConfig
from tdabench.integrity import CorruptFileError
from tdabench.projection import ProjectionConfig
from tdabench.projection_parts import Parts, PartsWriter, positions, select_sum
from tdabench.projection_stream import Plan, project_from_model

from test_streaming import examples


@pytest.mark.parametrize("kind, memory_gb", [("sjlt", 1.0), ("sjlt", 2e-4), ("gaussian", 1.0)])
def test_summed_blocks_are_the_selected_components_projected_from_the_model(tmp_path, kind, memory_gb):
    """Any budget (one group; a group a batch): each component's block is the same either way,
    and the sum adds them in the pass's order, so the sums equal the selections' projections bit
    for bit, and the full set's sum the full projection."""
    extraction = Extraction(model(), ExtractionConfig(COMPONENTS, 4, None, 0, None))
    parts = [examples(11, 1), examples(7, 2)]
    names = tuple(extraction.names)
    keys = [(8, 0), (16, 1)]
    full = [Plan(ProjectionConfig(kind, k, seed, 2 if kind == "sjlt" else 1), names, parts=True) for k, seed in keys]
    train_ids, query_ids = [f"t{i}" for i in range(11)], [f"q{i}" for i in range(7)]
    path = tmp_path / "parts.h5"
    with PartsWriter(path, kind, full[0].cfg.nonzeros, names, extraction.stored_dims, keys, train_ids, query_ids) as w:

        def on_part(i, name, first, block, seconds):
            w.add(full[i].cfg.k, full[i].cfg.seed, names.index(name), first, block, seconds)

        whole, _ = project_from_model(extraction, 0, parts, full, memory_gb, on_part=on_part)
    selections = [[names[3], names[1]], [names[0]], list(names[2:])]
    direct = [Plan(p.cfg, tuple(s)) for p in full for s in selections]
    want, _ = project_from_model(extraction, 0, parts, direct, memory_gb)
    with Parts(path) as stored:
        stored.check(kind, full[0].cfg.nonzeros, keys)
        assert stored.components == list(names) and stored.train_ids == train_ids
        for i, (k, seed) in enumerate(keys):
            blocks, seconds = stored.blocks(k, seed)
            assert blocks.shape == (len(names), 18, k) and (seconds > 0).all()
            np.testing.assert_array_equal(select_sum(blocks, positions(names, names)), whole[i])
            for j, chosen in enumerate(selections):
                np.testing.assert_array_equal(
                    select_sum(blocks, positions(names, chosen)), want[i * len(selections) + j]
                )


def test_a_parts_file_of_another_projection_is_refused(tmp_path):
    path = tmp_path / "parts.h5"
    with PartsWriter(path, "sjlt", 1, ["a"], [4], [(8, 0)], ["t"], ["q"]) as w:
        w.add(8, 0, 0, 0, np.ones((2, 8), dtype=np.float32), 0.1)
    with Parts(path) as stored:
        stored.check("sjlt", 1, [(8, 0)])
        for kind, nonzeros, keys in [("gaussian", 1, [(8, 0)]), ("sjlt", 2, [(8, 0)]), ("sjlt", 1, [(16, 0)])]:
            with pytest.raises(CorruptFileError, match="rerun the job that writes it"):
                stored.check(kind, nonzeros, keys)
        with pytest.raises(KeyError, match="not in the parts file"):
            positions(stored.components, ["b"])
