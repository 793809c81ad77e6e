"""The report: every scene's evaluation as tables, figures, image grids and one self-contained HTML.

    python -m lrf.report --results results --config-json '{"scenes": [...], "methods": [...]}' \\
        --out results/report

collect (runs, their errors, stage 1/3 JSON and curves) -> claims (the abstract's claims, each
with a verdict computed from the numbers per split) and tables -> figures -> grids -> html,
driven by build.build_report; __main__ is the command line.
"""
from lrf.report.build import build_report, write_outputs
from lrf.report.collect import Run, before_after_rows, collect_runs, consistency_selection

__all__ = ["Run", "before_after_rows", "build_report", "collect_runs", "consistency_selection", "write_outputs"]
