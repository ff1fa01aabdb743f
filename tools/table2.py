"""Reproduce the paper's Table 2 / Table 3 counts / Figure 2 from real files: same as `freezepack table2`.

    python tools/table2.py --figure --report docs/RESULTS.md     # full run (~15 min on 2 cores)
    python tools/table2.py --quick                               # CI-sized
"""
from freezepack.cli.table2 import table2

if __name__ == "__main__":
    table2(prog_name="tools/table2.py")
