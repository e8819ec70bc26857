"""Staleness sweeps (the ``minpro-sweep`` command): grid.py (cells, markers), command.py (running them),
report.py (the collector). Usage: command.py's docstring."""

from minpro_megatron.sweep.command import main, run_local  # noqa: F401
from minpro_megatron.sweep.grid import (  # noqa: F401
    CELL_FILE, DONE_MARKER, FAILED_MARKER, Cell, cell_checkpoint_dir, is_done, load_grid, select_cells, validate_cells,
)
from minpro_megatron.sweep.report import (  # noqa: F401
    RESULTS_BEGIN, RESULTS_END, SWEEP_PLOT_TAGS, TABLE_TAGS, collect, read_run_scalars, run_stats, update_doc,
)
