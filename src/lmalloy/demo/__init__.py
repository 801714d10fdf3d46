"""The end-to-end demo: each stage reproduces one paper's claim in small, on the
built-in corpus, and adds a section to runs/demo/report.{md,html}."""
