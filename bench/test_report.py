#!/usr/bin/env python3
"""Checks of bench/report.py's own logic (no fio run needed):
python3 bench/test_report.py"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


if __name__ == "__main__":
    unittest.main()
