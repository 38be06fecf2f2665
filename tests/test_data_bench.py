"""`python -m data_pipeline.tools.bench`'s sweep: one cell per combination of the settings asked for, DALI's settings only
for DALI, and row names that show what varies."""

from __future__ import annotations

from data_pipeline.tools import bench


def test_sweep_cells_and_labels():
    args = bench.build_parser().parse_args(
        ["--questions", "table", "tokenize", "--workers", "1", "2", "--hw-decoder-load", "0.5", "0.9"]
    )
    dali = bench._settings(args, "dali")
    assert len(dali) == 2 * 2 * 2 and {c["prefetch"] for c in dali} == {2}
    torch_cells = bench._settings(args, "torch")
    assert torch_cells == [{"questions": q, "workers": w} for q in ("table", "tokenize") for w in (1, 2)]
    cell = {"questions": "table", "workers": 2, "hw_decoder_load": 0.9, "prefetch": 2}
    assert bench._label("dali-gpu", cell, args) == "dali-gpu, questions table, workers 2, hw_decoder_load 0.9"
    assert (
        bench._label("dali-cpu", cell, args) == "dali-cpu, questions table, workers 2"
    )  # no hardware decoder
    defaults = bench.build_parser().parse_args([])
    assert defaults.questions == ["table"] and defaults.prefetch == [2] and defaults.hw_decoder_load == [0.65]
