"""The papers' tables as runnable recipes (``experiments/<method>/tables.yaml``) and the report that puts the
paper's printed numbers beside the measured ones: ``python -m ssl_zoo.tables MANIFEST [--runs runs/]``.

:mod:`ssl_zoo.tables.manifest` reads and checks the format; :mod:`ssl_zoo.tables.report` renders it.
"""

from ssl_zoo.tables.manifest import (
    Manifest,
    ManifestError,
    Row,
    Table,
    check_manifest,
    load_manifest,
    resolve_chain,
    run_name,
    setting_value,
    unfilled_cells,
)
from ssl_zoo.tables.report import (
    Comparison,
    compare,
    main,
    measured_metrics,
    render_csv,
    render_json,
    render_markdown,
    row_commands,
)

__all__ = ["Comparison", "Manifest", "ManifestError", "Row", "Table", "check_manifest", "compare",
           "load_manifest", "main", "measured_metrics", "render_csv", "render_json", "render_markdown",
           "resolve_chain", "row_commands", "run_name", "setting_value", "unfilled_cells"]
