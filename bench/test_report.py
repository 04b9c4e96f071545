#!/usr/bin/env python3
"""Checks of the bench reports' own logic (no fio run needed):
python3 bench/test_report.py"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import matrix_report  # noqa: E402
import report  # noqa: E402


class MarkedSections(unittest.TestCase):
    def test_every_marked_section_is_kept_in_order_and_the_rest_is_not(self):
        text = "\n".join([
            "# Benchmarks", "old data-plane table",
            "<!-- controller-bench:begin -->", "controller", "<!-- controller-bench:end -->",
            "between the sections",
            "<!-- control-plane-bench:begin -->", "control plane", "<!-- control-plane-bench:end -->",
            "<!-- control-plane-analysis:begin -->", "analysis", "<!-- control-plane-analysis:end -->",
            "trailing text",
        ])
        kept = report.marked_sections(text)
        self.assertEqual(kept, "\n\n".join([
            "<!-- controller-bench:begin -->\ncontroller\n<!-- controller-bench:end -->",
            "<!-- control-plane-bench:begin -->\ncontrol plane\n<!-- control-plane-bench:end -->",
            "<!-- control-plane-analysis:begin -->\nanalysis\n<!-- control-plane-analysis:end -->",
        ]))

    def test_a_section_without_its_end_marker_is_not_kept(self):
        text = "<!-- a:begin -->\nx\n<!-- b:end -->\n<!-- c:begin -->\ny\n<!-- c:end -->"
        self.assertEqual(report.marked_sections(text), "<!-- c:begin -->\ny\n<!-- c:end -->")

    def test_a_file_without_markers_keeps_nothing(self):
        self.assertEqual(report.marked_sections("# Benchmarks\nno sections\n"), "")


class Compare(unittest.TestCase):
    OLD = "\n".join([
        "# Benchmarks", "## Results", "",
        "| row | nbd-csi | nbdkit |", "|---|---:|---:|",
        "| 4k randread (IOPS) | 87,057 | 78,940 |",
        "| 1 MiB seq read (MB/s) | 3,555.5 | 1,588.9 |",
        "## Workload matrix", "",
        "| workload | QD1 × 1 conn |", "|---|---:|",
        "| random read 4k | **1.10** k · 9.7/11.5 |",
    ])

    def test_a_cell_is_named_by_heading_row_and_column(self):
        cells = compare.cells(self.OLD)
        self.assertEqual(cells[("Results", "4k randread (IOPS)", "nbd-csi")], 87057)
        self.assertEqual(cells[("Results", "1 MiB seq read (MB/s)", "nbdkit")], 1588.9)
        # The ratio, not the CPU figures after it; bold marks are not numbers.
        self.assertEqual(cells[("Workload matrix", "random read 4k", "QD1 × 1 conn")], 1.10)
        self.assertEqual(len(cells), 5)

    def test_the_separator_row_and_prose_are_not_cells(self):
        cells = compare.cells("text 12 here\n| a | b |\n|---|---:|\n| x | - |\n")
        self.assertEqual(cells, {})


class MatrixCells(unittest.TestCase):
    def test_cell_names_parse_into_their_dimensions(self):
        m = matrix_report.CELL_RE.match
        self.assertEqual(m("randrw-64k-qd16-c4").groups(), ("randrw", "64k", "16", "4", None, None))
        self.assertEqual(m("randwrite-4k-qd1-c1-flush1").groups(), ("randwrite", "4k", "1", "1", "1", None))
        self.assertEqual(m("randwrite-1M-qd16-c1@sparse").groups(),
                         ("randwrite", "1M", "16", "1", None, "sparse"))
        self.assertIsNone(m("fua-4k-qd1"))

    def cell(self, iops, cpu):
        c = matrix_report.Cell.__new__(matrix_report.Cell)
        c.iops, c.cpu, c.latency = iops, cpu, {}
        return c

    def test_ratio_is_against_the_fastest_peer_and_bold_below_target(self):
        cells = {"nbd-csi": self.cell(120, 5.0), "qemu-nbd": self.cell(50, 20.0),
                 "nbdkit": self.cell(100, 11.5), "nbd-server": self.cell(None, None)}
        self.assertEqual(matrix_report.ratio_text(cells), "**1.20** k · 5.0/11.5")
        cells["nbd-csi"] = self.cell(140, 4.0)
        self.assertEqual(matrix_report.ratio_text(cells), "1.40 k · 4.0/11.5")
        cells["nbd-csi"] = self.cell(None, None)
        self.assertEqual(matrix_report.ratio_text(cells), "failed")

    def test_a_cell_near_the_no_io_ceiling_is_marked_client_bound(self):
        cells = {"nbd-csi": self.cell(110, 9.7), "qemu-nbd": self.cell(40, 22.0),
                 "nbdkit": self.cell(100, 11.5), "nbd-server": self.cell(50, 18.0),
                 "null": self.cell(120, 3.0)}
        self.assertEqual(matrix_report.ratio_text(cells), "**1.10**† k · 9.7/11.5")
        cells["null"] = self.cell(200, 3.0)
        self.assertEqual(matrix_report.ratio_text(cells), "**1.10** k · 9.7/11.5")


if __name__ == "__main__":
    unittest.main()
