"""benchmarks/host_syncs.py and the table it recorded (docs/benchmarks/host-syncs.md and .json): the
counts are exact on the simulated GPU, so a rerun must give the recorded numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_recorded_host_sync_table_is_what_the_benchmark_counts_now(cudnn_library):
    import host_syncs

    result = host_syncs.measure()
    recorded = json.loads((ROOT / "docs" / "benchmarks" / "host-syncs.json").read_text())
    assert result == recorded
    assert host_syncs.to_markdown(result) in (ROOT / "docs" / "benchmarks" / "host-syncs.md").read_text()
    rows = {row["configuration"]: row for row in result["rows"]}
    defaults = [row for name, row in rows.items() if name.startswith("defaults")]
    assert len(defaults) == 7 and all(row["syncs_per_step"] == [0] * host_syncs.STEPS for row in defaults)
    raising = rows["SPATIAL_PERSISTENT, NCHW float32, raise"]
    assert raising["syncs_per_step"] == [2 * host_syncs.LAYERS] * host_syncs.STEPS  # a forward and a backward each
